"""What a recipe asks for after training, applied in order to the trained run: per-label thresholds tuned
on validation (multi-label, ``eval.tune_thresholds``), then pruning (``prune:``; the pruned model's run
folder and metrics become the result). Later techniques (distillation, export) go here too.

``run_recipe`` is a run as users and tools ask for it: ``Recipe.run``, sweep trials and ``compare`` call it.
The lifecycle itself is ``finetune.run.train_run``; pruning's recovery fine-tune calls that one directly,
which is why these steps live a layer above it.
"""

from __future__ import annotations

from collections.abc import Callable

from finetune.config import RecipeConfig
from finetune.errors import Interrupted
from finetune.prune import prune_after_training
from finetune.run import train_run
from finetune.runs import RunResult
from finetune.thresholds import tune_thresholds


def run_recipe(recipe: RecipeConfig, resume: bool = False, overwrite: bool | None = None, *,
               on_validation: Callable[[dict], None] | None = None, quiet: bool = False) -> RunResult:
    """Train a recipe end to end (``train_run``, same arguments and errors), then apply what it asks for
    after training; see ``Recipe.run``."""
    result = train_run(recipe, resume, overwrite, on_validation=on_validation, quiet=quiet)
    try:
        return after_training(result, recipe)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted (Ctrl-C) after training; kept: the trained model in {result.run_dir}") from None


def after_training(result: RunResult, recipe: RecipeConfig) -> RunResult:
    if recipe.eval.tune_thresholds:
        result.metrics = tune_thresholds(result.run_dir)
    if recipe.prune.method == "none":
        return result
    return prune_after_training(result, recipe)
