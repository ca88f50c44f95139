"""Full fine-tuning: every parameter trains."""

from torch import nn


def apply(model: nn.Module, recipe) -> nn.Module:
    model.requires_grad_(True)
    return model
