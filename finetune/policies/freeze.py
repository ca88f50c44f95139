"""Partial freezing: the embeddings and/or the first N encoder layers are frozen."""

from torch import nn

from finetune.config import RecipeError


def encoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's stack of transformer blocks (the ModuleList with num_hidden_layers entries)."""
    count = backbone.config.num_hidden_layers
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise RecipeError(f"policy: cannot find the {count} encoder layers of {type(backbone).__name__}")


def apply(model: nn.Module, recipe) -> nn.Module:
    cfg = recipe.policy
    model.requires_grad_(True)
    if cfg.freeze_embeddings:
        model.backbone.get_input_embeddings().requires_grad_(False)
        embeddings = getattr(model.backbone, "embeddings", None)  # position/type embeddings and their norm
        if embeddings is not None:
            embeddings.requires_grad_(False)
    layers = encoder_layers(model.backbone)
    if cfg.freeze_layers > len(layers):
        raise RecipeError(f"policy.freeze_layers={cfg.freeze_layers} but the backbone has only {len(layers)} layers")
    for layer in layers[: cfg.freeze_layers]:
        layer.requires_grad_(False)
    return model
