"""Training policies: what trains. One module per policy, each with ``apply(model, recipe)``.

``apply_policy`` returns the model to train (a ``peft`` wrapper for LoRA); the run logs
the trainable and total parameter counts, so every run states what it really updates.
"""

from __future__ import annotations

from torch import nn

from finetune.config import Recipe
from finetune.policies import freeze, full, head_only, lora

POLICIES = {"full": full.apply, "head_only": head_only.apply, "freeze": freeze.apply, "lora": lora.apply}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def apply_policy(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Set what trains; the caller logs ``count_parameters`` once the run log is open."""
    return POLICIES[recipe.policy.kind](model, recipe)
