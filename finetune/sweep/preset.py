"""``sweep.preset: auto``: a search chosen for the recipe, so a user gives a budget and nothing else.

What it searches, and why:

- **policy**, paired: full fine-tuning; LoRA (rank 16, alpha 32, the recipe's or the architecture's target
  modules); the lower half of the encoder frozen with the embeddings (its features are cached once, so
  those trials are cheap). The policies want different learning rates, so each has its own range:
- **learning rate**, log-uniform per policy (``lr_full``, ``lr_lora``, ``lr_freeze``, all setting train.lr):
  full 1e-5..2e-4, LoRA 1e-4..3e-3, frozen lower layers 2e-5..3e-4 (ranges where 6- to 12-layer encoders
  train on sentence tasks; the best trials of this project's SST-2, TREC and AG News runs lie inside).
- **label smoothing** 0 or 0.1 and the **schedule** linear or cosine: the two levers that helped on SST-2
  (benchmarks/levers); classification tasks only.

**Epochs are the fidelity, not a searched value**: every trial has the recipe's schedule, and Hyperband
(successive halving in brackets, reduction factor 3) stops the weaker ones at its rungs, the recipe's
evaluations. Comparing trials of one schedule at the same step is fair; searching epochs with step-wise
pruning is not (a short schedule looks better early). TPE (multivariate, conditional) proposes after 5
random trials; the very first trial is the recipe as written, when it lies in the space (a LoRA or frozen-layer
recipe's own settings stand for that policy). A parameter given beside the preset replaces the preset's one
of the same name. When less is left than a whole trial takes, one more trial trains a schedule shortened to
end in time (sweep.fill_budget), so short budgets are not left a quarter idle.
"""

from __future__ import annotations

import json
import logging

from finetune.config import RecipeConfig
from finetune.sweep.config import SEARCHED_LENGTH, PrunerConfig, SweepConfig
from finetune.sweep.space import ParamSpec, covered_keys

log = logging.getLogger("finetune.sweep")

LR_RANGES = {"full": (1e-5, 2e-4), "lora": (1e-4, 3e-3), "freeze": (2e-5, 3e-4)}
STARTUP_TRIALS = 5
MAX_TRIALS = 500  # the budget, not this, ends an auto search
KEEP_TOP_K = 6  # the ensemble's candidates


def resolve(recipe: RecipeConfig, cfg: SweepConfig) -> SweepConfig:
    """The sweep section with the preset filled in (no preset: unchanged). Settings the user wrote stay, so a
    resumed sweep (its sweep.yaml holds the filled-in section) resolves to the same search."""
    if cfg.preset != "auto":
        return cfg
    given = cfg.model_fields_set
    parameters = {**auto_parameters(recipe), **cfg.parameters}
    update = {"parameters": parameters}
    defaults = {"method": "bayes", "startup_trials": STARTUP_TRIALS, "n_trials": MAX_TRIALS,
                "keep_top_k": KEEP_TOP_K, "test": "none",  # the ensemble step scores the kept models on test
                "pruner": PrunerConfig(kind="hyperband", reduction_factor=3),
                # time too short for a whole trial goes to a shortened one, unless the user searches the length
                "fill_budget": not set(SEARCHED_LENGTH) & covered_keys(parameters)}
    update.update({k: v for k, v in defaults.items() if k not in given})
    return SweepConfig.model_validate({**cfg.model_dump(exclude_unset=True), **{
        k: (v.model_dump(exclude_defaults=True) if isinstance(v, PrunerConfig) else v) for k, v in update.items()}})


def recipe_first(recipe: RecipeConfig, cfg: SweepConfig) -> list[dict]:
    """With preset auto, the recipe as written is the first trial when it lies in the space (the search starts
    from what the user had, so its best is at least that on validation); else nothing."""
    if cfg.preset != "auto":
        return []
    from finetune.sweep.space import express, recipe_values

    params, why = express({}, cfg.parameters, recipe_values(recipe.to_dict()))
    if params is None:
        log.info("preset auto: the recipe's own settings lie outside the search (%s); they are not tried first", why)
        return []
    return [params]


def auto_parameters(recipe: RecipeConfig) -> dict[str, ParamSpec]:
    own = recipe.policy  # the recipe's own LoRA or frozen-layer settings stand for their kind, so it can be tried
    lora = {"policy.kind": "lora", "policy.lora.rank": own.lora.rank if own.kind == "lora" else 16,
            "policy.lora.alpha": own.lora.alpha if own.kind == "lora" else 32}
    policies: dict[str, dict] = {"full": {"policy.kind": "full"}, "lora": lora}
    layers = encoder_layers(recipe)
    if own.kind == "freeze" and own.freeze_layers:
        policies["freeze"] = {"policy.kind": "freeze", "policy.freeze_embeddings": own.freeze_embeddings,
                              "policy.freeze_layers": own.freeze_layers}
    elif layers is not None and layers >= 2:
        policies["freeze"] = {"policy.kind": "freeze", "policy.freeze_embeddings": True,
                              "policy.freeze_layers": layers // 2}
    space: dict[str, ParamSpec] = {"policy": ParamSpec(choice=list(policies.values()))}
    for name, choice in policies.items():
        space[f"lr_{name}"] = ParamSpec(loguniform=LR_RANGES[name], key="train.lr", when={"policy": choice})
    from finetune.tasks import TASKS

    if TASKS[recipe.task].classes and recipe.distill.teacher is None:  # smoothing needs a class target
        space["train.label_smoothing"] = ParamSpec(choice=[0.0, 0.1])
    space["train.scheduler"] = ParamSpec(choice=["linear", "cosine"])
    return space


def encoder_layers(recipe: RecipeConfig) -> int | None:
    """The backbone's encoder layers (after backbone.num_layers), from its config.json; None if unknown."""
    if recipe.backbone.num_layers is not None:
        return recipe.backbone.num_layers
    from finetune.backbones import resolve_backbone

    try:
        config = json.loads((resolve_backbone(recipe.backbone) / "config.json").read_text())
    except Exception as err:  # noqa: BLE001 - the preset then leaves frozen layers out, and says so
        log.info("preset auto: the backbone's layer count is unknown (%s); frozen lower layers are not searched", err)
        return None
    for key in ("num_hidden_layers", "n_layers", "num_layers", "n_layer"):
        if isinstance(config.get(key), int):
            return config[key]
    return None
