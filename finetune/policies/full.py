"""Full fine-tuning: every parameter trains."""

from torch import nn

from finetune.policies.policy import Policy


def apply(model: nn.Module, recipe) -> nn.Module:
    model.requires_grad_(True)
    return model


POLICY = Policy("full", apply, lr=1e-4)
