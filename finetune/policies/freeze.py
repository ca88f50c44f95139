"""Partial freezing: the embeddings and/or the first N encoder layers are frozen."""

from torch import nn

from finetune.config import RecipeError
from finetune.modeling import encoder_layers
from finetune.policies.policy import Cache, Policy


def apply(model: nn.Module, recipe) -> nn.Module:
    cfg = recipe.policy
    model.requires_grad_(True)
    if cfg.freeze_embeddings:
        model.backbone.get_input_embeddings().requires_grad_(False)
        embeddings = getattr(model.backbone, "embeddings", None)  # position/type embeddings and their norm
        if embeddings is not None:
            embeddings.requires_grad_(False)
    try:
        layers = encoder_layers(model.backbone)  # the one way to find them, shared with pruning
    except ValueError as err:
        raise RecipeError(f"policy.kind=freeze: {err}") from None
    if cfg.freeze_layers > len(layers):
        raise RecipeError(f"policy.freeze_layers={cfg.freeze_layers} but the backbone has only {len(layers)} layers")
    for layer in layers[: cfg.freeze_layers]:
        layer.requires_grad_(False)
    return model


def cache(recipe) -> Cache | None:
    # the hidden states after layer N depend on nothing trained only when the embeddings are frozen too
    cfg = recipe.policy
    return "hidden" if cfg.freeze_embeddings and cfg.freeze_layers > 0 else None


POLICY = Policy("freeze", apply, frozen_eval=True, cache=cache, lr=1e-4, preset=("policy.freeze_embeddings=true",))
