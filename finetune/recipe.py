"""``Recipe``: the validated schema (finetune.config) with the verbs users call on it.

    from finetune import Recipe
    result = Recipe.from_yaml("recipes/sst2_minilm_lora.yaml", overrides=["train.lr=3e-4"]).run()

The schema stands alone (it imports nothing that trains); this class sits above the run story and the
sweep, so ``recipe.run()`` and ``recipe.sweep()`` read as before.
"""

from __future__ import annotations

from typing import Any

from finetune.config import RecipeConfig
from finetune.runs import RunResult


class Recipe(RecipeConfig):
    """Backbone + head + policy + data + training loop: everything a run needs, and the verbs to run it."""

    def run(self, resume: bool = False, overwrite: bool | None = None) -> RunResult:
        """Train, select the best evaluation, evaluate on test, save the run folder and (``eval.analyze``)
        its analysis of the test split.

        Returns a ``RunResult`` (metrics, run folder, best checkpoint).
        """
        from finetune.techniques import (  # the training stack loads when a run starts
            analyze_run,
            run_recipe,
        )

        result = run_recipe(self, resume=resume, overwrite=overwrite)
        analyze_run(result, self)
        return result

    def sweep(self, parameters: dict[str, Any], method: str = "bayes", n_trials: int | None = None, **settings):
        """Search over dotted recipe keys, e.g.
        ``recipe.sweep({"train.lr": {"loguniform": [1e-5, 1e-3]}, "policy.lora.rank": [4, 8, 16]}, n_trials=12)``.

        ``settings`` are any other sweep fields (objective, pruner, repeats, dir, storage, ...).
        Returns a ``SweepResult`` (trials, best params, best run folder); re-running resumes.
        """
        from finetune.sweep import parse_sweep, run_sweep

        raw = {"parameters": parameters, "method": method, **settings}
        if n_trials is not None:
            raw["n_trials"] = n_trials
        return run_sweep(self, parse_sweep(raw))

    def auto(self, budget: float | str, **settings):
        """Search and ensemble within a wall-clock budget (seconds, or "30m", "2h"): ``sweep.preset: auto``,
        see ``finetune.sweep.auto``. ``settings`` are other sweep fields (dir, seed, parameters, ...).
        Returns an ``AutoResult`` (the sweep, the summary, the ensemble folder, the report); re-running resumes.
        """
        from finetune.sweep import parse_sweep
        from finetune.sweep.auto import run_auto

        return run_auto(self, parse_sweep({"preset": "auto", "budget": budget, **settings}))
