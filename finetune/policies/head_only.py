"""Linear probe / head-only: the backbone is frozen, only the task head trains."""

from torch import nn


def apply(model: nn.Module, recipe) -> nn.Module:
    model.requires_grad_(True)
    model.backbone.requires_grad_(False)
    return model
