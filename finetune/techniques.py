"""What a recipe asks for after training, applied in order to the trained run: per-label thresholds tuned
on validation (multi-label, ``eval.tune_thresholds``), then pruning (``prune:``; the pruned model's run
folder and metrics become the result). Later techniques (distillation, export) go here too.

``run_recipe`` is a run as users and tools ask for it: ``Recipe.run``, sweep trials and ``compare`` call it.
The lifecycle itself is ``finetune.run.train_run``; pruning's recovery fine-tune calls that one directly,
which is why these steps live a layer above it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from finetune.config import RecipeConfig
from finetune.errors import FinetuneError, Interrupted
from finetune.prune import prune_after_training
from finetune.run import train_run
from finetune.runs import RunResult
from finetune.thresholds import tune_thresholds

log = logging.getLogger("finetune")


def run_recipe(recipe: RecipeConfig, resume: bool = False, overwrite: bool | None = None, *,
               on_validation: Callable[[dict], None] | None = None, quiet: bool = False,
               test: bool | Callable[[dict], bool] = True, deadline: float | None = None) -> RunResult:
    """Train a recipe end to end (``train_run``, same arguments and errors), then apply what it asks for
    after training; see ``Recipe.run``."""
    result = train_run(recipe, resume, overwrite, on_validation=on_validation, quiet=quiet, test=test,
                       deadline=deadline)
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


def analyze_run(result: RunResult, recipe: RecipeConfig) -> None:
    """``eval.analyze``: write RUN/analysis/ for the test split of a finished run (rank 0 only). The model is
    already saved, so a failure here is logged with its reason and the run still counts as done."""
    if not recipe.eval.analyze or not recipe.data.splits.test or os.environ.get("RANK", "0") != "0":
        return
    from finetune import runs
    from finetune.analysis.collect import collect
    from finetune.analysis.report import analyze_outputs

    started = time.perf_counter()
    try:
        analysis = analyze_outputs(collect(result.run_dir, "test"), result.run_dir / runs.ANALYSIS)
    except (FinetuneError, OSError, ValueError) as err:
        log.warning("analysis of the test split skipped (%s: %s); the run is complete. Try: finetune analyze %s",
                    type(err).__name__, err, result.run_dir)
        return
    log.info("analysis of the test split (%.1f s; eval.analyze=false skips it):", time.perf_counter() - started)
    for line in analysis.console:
        log.info("  %s", line)
