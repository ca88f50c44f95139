"""The recovery fine-tune after pruning: the pruned model trained by the run's own lifecycle
(``finetune.run.train_run``), on the run's data and training settings, in a run folder of its own that is
deleted once its model is back. Magnitude masks stay attached while it trains (``weight_orig`` trains,
``weight_mask`` is a buffer), so the sparsity still holds at the end; the best evaluation's weights are kept.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from finetune.config import PruneConfig, RecipeConfig
from finetune.run import train_run

log = logging.getLogger("finetune")


def recover(model: nn.Module, recipe: RecipeConfig, cfg: PruneConfig, folder: Path) -> dict[str, Any]:
    """Fine-tune every remaining weight of ``model`` (in place) for ``cfg.finetune_epochs`` with the run's
    training settings (batch size, schedule, warm-up, clipping, evaluation) and ``finetune_lr`` or train.lr;
    ``folder`` holds the recovery run while it trains."""
    lr = cfg.finetune_lr or recipe.train.lr
    # a policy's own keys (lora:, merge_lora) fall back to their defaults under kind=full, as for any override
    settings = recipe.with_overrides([
        "policy.kind=full", "prune.method=none", "train.max_steps=", f"train.epochs={cfg.finetune_epochs}",
        f"train.lr={lr}", f"output.dir={folder}", "output.overwrite=true", "output.keep=model", "output.report_to=[]",
        *(["eval.tune_thresholds=false"] if recipe.eval.tune_thresholds else [])])
    handlers = list(log.handlers)  # the run's own logging replaces these; the pruning's log goes on after it
    try:
        result = train_run(settings, model=model)
    finally:
        for handler in list(log.handlers):
            if handler not in handlers:
                handler.close()
                log.removeHandler(handler)
        for handler in handlers:
            if handler not in log.handlers:
                log.addHandler(handler)
        shutil.rmtree(folder, ignore_errors=True)
    metrics = result.metrics
    log.info("recovery fine-tune: %d steps, lr %.2e, %.1f s, best step %d", metrics["optimizer_steps"], lr,
             metrics["train_seconds"], result.best_step)
    return {"epochs": cfg.finetune_epochs, "lr": lr, "steps": metrics["optimizer_steps"], "best_step": result.best_step,
            "seconds": round(metrics["train_seconds"], 1), "validation": metrics["validation"]}
