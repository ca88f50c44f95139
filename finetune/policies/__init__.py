"""Training policies: what trains. One module per policy, each defining ``POLICY`` (a ``Policy``).

``apply_policy`` returns the model to train (a ``peft`` wrapper for adapter policies); the run logs
the trainable and total parameter counts, so every run states what it really updates. ``plain``
turns an adapter model back into one plain model (for ``merged/``, pruning, ensembles, latency).

A new policy is one module here plus its entry in ``POLICIES``, its name in ``PolicyConfig.kind``
(finetune/config.py) and, for an adapter or a policy with settings of its own, a line in
``finetune.recipe_checks``.
"""

from __future__ import annotations

from torch import nn

from finetune.config import RecipeConfig
from finetune.policies import bitfit, dora, freeze, full, head_only, ia3, lora
from finetune.policies.adapters import plain
from finetune.policies.policy import Cache, Policy

POLICIES: dict[str, Policy] = {p.name: p for p in (full.POLICY, lora.POLICY, head_only.POLICY, freeze.POLICY,
                                                   bitfit.POLICY, ia3.POLICY, dora.POLICY)}

__all__ = ["POLICIES", "Cache", "Policy", "apply_policy", "count_parameters", "plain", "policy_of"]


def policy_of(recipe: RecipeConfig) -> Policy:
    """The recipe's policy (``policy.kind``)."""
    return POLICIES[recipe.policy.kind]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def apply_policy(model: nn.Module, recipe: RecipeConfig) -> nn.Module:
    """Set what trains; the caller logs ``count_parameters`` once the run log is open."""
    return policy_of(recipe).apply(model, recipe)
