"""(IA)³ via peft: learned vectors that scale the keys, the values and the feed-forward activations
(Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"); the task head trains in full. The fewest trained weights of the adapter policies:
13,824 + the head on all-MiniLM-L6-v2.

Defaults follow the paper on top of peft's per-architecture lists. peft lists BERT's modules as
``key, value, output.dense``, and a list entry matches any dotted suffix, so ``output.dense`` also
hits the attention block's output projection (``attention.output.dense``): that one is excluded.

The vectors start at 1 and train without weight decay (decay would pull them towards 0, not 1).
"""

from __future__ import annotations

from torch import nn

from finetune.config import RecipeError
from finetune.policies.adapters import (
    HEAD,
    linear_names,
    matches,
    peft_task_type,
    target_modules,
)
from finetune.policies.policy import Policy

# a suffix peft's lists match in BERT-style encoders besides the feed-forward output it means
ATTENTION_OUTPUT = "attention.output.dense"


def settings(model: nn.Module, recipe) -> dict[str, list[str]]:
    """``target_modules``, ``feedforward_modules`` and ``exclude_modules`` for peft's ``IA3Config``:
    the recipe's, each None filled in for the backbone's architecture."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    cfg = recipe.policy.ia3
    targets = target_modules(model, cfg.target_modules, TARGETS, "policy.ia3.target_modules")
    feedforward = cfg.feedforward_modules
    if feedforward is None:  # peft's list for the architecture, as far as it is targeted
        feedforward = [m for m in FEEDFORWARD.get(model.backbone.config.model_type, []) if m in targets]
    elif not set(feedforward) <= set(targets):
        raise RecipeError(f"policy.ia3.feedforward_modules: {sorted(set(feedforward) - set(targets))} "
                          f"are not in target_modules {targets}; list every feed-forward module there too")
    exclude = cfg.exclude_modules
    if exclude is None:  # the paper's set: output.dense means the feed-forward one only
        has_attention_output = any(matches(name, ATTENTION_OUTPUT) for name in linear_names(model))
        exclude = [ATTENTION_OUTPUT] if "output.dense" in targets and has_attention_output else []
    return {"target_modules": targets, "feedforward_modules": feedforward, "exclude_modules": exclude}


def apply(model: nn.Module, recipe) -> nn.Module:
    from peft import IA3Config, get_peft_model

    peft_config = IA3Config(task_type=peft_task_type(recipe), modules_to_save=list(HEAD), **settings(model, recipe))
    return get_peft_model(model, peft_config)


def describe(recipe) -> str:
    cfg = recipe.policy.ia3
    if cfg.target_modules is None and cfg.feedforward_modules is None and cfg.exclude_modules is None:
        return "keys, values and feed-forward activations scaled"
    return ", ".join(f"{name} {value}" for name, value in cfg.model_dump().items() if value is not None)


POLICY = Policy("ia3", apply, adapter=True, no_decay=("ia3_l",), lr=3e-3, describe=describe)
