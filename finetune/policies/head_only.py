"""Linear probe / head-only: the backbone is frozen, only the task head trains."""

from torch import nn

from finetune.policies.policy import Cache, Policy


def apply(model: nn.Module, recipe) -> nn.Module:
    model.requires_grad_(True)
    model.backbone.requires_grad_(False)
    return model


def cache(recipe) -> Cache | None:
    # one pooled vector per example; a head labelling each word reads every token's hidden state instead
    from finetune.tasks import TASKS

    return None if TASKS[recipe.task].words else "pooled"


POLICY = Policy("head_only", apply, frozen_eval=True, cache=cache, lr=5e-3)
