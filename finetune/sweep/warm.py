"""Warm start: a new sweep learns from an earlier one (``sweep.warm_start``).

When the study is created, before its own trials:

- the earlier best settings (``warm_start_top``) are its first trials: the parameters that are in this
  space with values inside it; the others are sampled (a grid takes the recipe's value, or the first);
- the earlier finished trials (complete and pruned) that lie in this space are lent to the study, re-expressed
  in this space's distributions and marked ``warm_start_from``, so the sampler models them from the start.
  A trial lies in this space when each parameter's value (or, for a parameter new here, the value of the
  recipe it ran on) is inside this space, and each setting it searched that this space doesn't equals
  this recipe's. Their learning curves come along only when the base recipes are the same, so a pruner
  compares curves of one recipe only.

Lent trials are not the sweep's own: n_trials, the report, keep_top_k, best/ and ensembles leave them out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from finetune.config import RecipeError
from finetune.sweep.config import SweepConfig, warm_source
from finetune.sweep.space import (
    covered_keys,
    distribution,
    express,
    grid_point,
    recipe_values,
    settings_of,
    to_overrides,
)
from finetune.sweep.storage import open_storage
from finetune.sweep.trials import (
    CONFIG,
    WARM_FROM,
    WARM_START,
    current_study,
    own_trials,
)
from finetune.sweep.widen import specs

log = logging.getLogger("finetune.sweep")


@dataclass
class WarmStart:
    source: str
    """The earlier sweep, as the log and the study record it."""
    study_name: str
    lent: list[FrozenTrial] = field(default_factory=list)
    """Earlier finished trials, re-expressed in this space, for the sampler."""
    skipped: list[str] = field(default_factory=list)
    """Why each earlier finished trial outside this space was left out."""
    first: list[dict] = field(default_factory=list)
    """The earlier best settings (params of this space) to try first."""
    first_overrides: list[list[str]] = field(default_factory=list)
    grid: bool = False

    def lend(self, study: optuna.Study) -> None:
        """Add the lent trials to the new study and record the warm start (call before its slots are published)."""
        study.add_trials(self.lent)
        tried = [" ".join(overrides) for overrides in self.first_overrides]
        study.set_user_attr(WARM_START, {"source": self.source, "study": self.study_name, "lent": len(self.lent),
                                         "skipped": len(self.skipped), "first": tried})
        why = f", e.g. {self.skipped[0]}" if self.skipped else ""
        knowledge = ("trials are recorded (a grid runs every combination; its order starts with the earlier best)"
                     if self.grid else "trials inform the sampler")
        log.info("warm start from %s: %d earlier %s (%d skipped: outside this space%s), best settings tried first: %s",
                 self.source, len(self.lent), knowledge, len(self.skipped), why, " | ".join(tried) or "none")


def load_warm_start(cfg: SweepConfig, fingerprint: dict, direction: str, sweep_dir: Path,
                    study_name: str) -> WarmStart:
    """The earlier sweep's trials and best settings, in this sweep's space.

    Raises:
        RecipeError: the source holds no such study, is this sweep's own, or optimises another metric or direction.
    """
    storage, name, source = _open_source(cfg, sweep_dir, study_name)
    earlier = current_study(storage, name)
    if earlier is None:
        names = optuna.get_all_study_names(storage)
        raise RecipeError(f"sweep.warm_start: {cfg.warm_start} holds no study {name!r}"
                          + (f" (it holds {', '.join(map(repr, names))}: name one with sweep.warm_start_study)"
                             if names else ""))
    saved = earlier.user_attrs.get(CONFIG) or {}
    metric = fingerprint["metric"]
    if saved.get("metric", metric) != metric:
        raise RecipeError(f"sweep.warm_start: {source} optimised validation {saved['metric']}, this sweep {metric}: "
                          f"their values can't inform each other; set sweep.objective.metric={saved['metric']}, "
                          "or start without a warm start")
    if earlier.direction.name.lower() != direction:
        raise RecipeError(f"sweep.warm_start: {source} {earlier.direction.name.lower()}s its objective, this sweep "
                          f"{direction}s it; set sweep.objective.direction={earlier.direction.name.lower()}")
    if not saved:
        log.warning("warm start: study %s records no search of this project; its values are taken as validation %s "
                    "and its parameters as recipe keys", name, metric)
    space = specs(fingerprint["parameters"])
    old_space = specs(saved["parameters"]) if "parameters" in saved else None
    warm = WarmStart(source, earlier.study_name, grid=cfg.method == "grid")
    ran_on, here = recipe_values(saved.get("recipe")), recipe_values(fingerprint["recipe"])
    same_recipe = saved.get("recipe") == fingerprint["recipe"]
    searched_here = covered_keys(space)
    for trial in earlier.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if trial.user_attrs.get("duplicate_of") is not None:
            continue  # a re-proposed setting that reused another trial's result: nothing new
        settings = settings_of(trial.params, old_space)
        # a trial the earlier sweep was lent itself ran on a recipe not known here
        params, why = express(settings, space, None if WARM_FROM in trial.user_attrs else ran_on)
        differs = [f"{k}={v!r} differs from this recipe's {here(k)[1]!r}" for k, v in settings.items()
                   if k not in searched_here and here(k)[0] and here(k)[1] != v]
        if params is None or differs:
            warm.skipped.append(f"trial {trial.number}: {why or differs[0]}")
            continue
        warm.lent.append(optuna.trial.create_trial(
            state=trial.state, values=trial.values, params=params,
            distributions={k: distribution(space[k]) for k in params},
            user_attrs={WARM_FROM: f"{source}, trial {trial.number}", "overrides": to_overrides(params, space)},
            intermediate_values=dict(trial.intermediate_values) if same_recipe else None))
    best = sorted((t for t in own_trials(earlier, (TrialState.COMPLETE,)) if t.user_attrs.get("duplicate_of") is None),
                  key=lambda t: -t.value if direction == "maximize" else t.value)
    for trial in best:
        if len(warm.first) >= cfg.warm_start_top:
            break
        params = express(settings_of(trial.params, old_space), space, partial=True)[0]
        if not params:
            continue  # none of its settings is searched here (or inside this space)
        if cfg.method == "grid":
            params = grid_point(params, space, here)
        if params not in warm.first:
            warm.first.append(params)
            warm.first_overrides.append(to_overrides(params, space))
    return warm


def _open_source(cfg: SweepConfig, sweep_dir: Path, study_name: str) -> tuple[optuna.storages.BaseStorage, str, str]:
    """The earlier sweep's storage, study name, and how to name it in the log."""
    kind, where = warm_source(cfg.warm_start)
    if kind == "folder":
        if where.resolve() == sweep_dir.resolve():
            raise RecipeError(f"sweep.warm_start: {where} is this sweep's own folder; re-run the sweep to resume it "
                              "(a wider space widens it)")
        saved = yaml.safe_load((where / "sweep.yaml").read_text()) or {}
        section = saved.get("sweep") or {}
        name = cfg.warm_start_study or section.get("study") or saved.get("name")
        return open_storage(section.get("storage"), where), name, str(where)
    name = cfg.warm_start_study or study_name
    own = cfg.storage or str(sweep_dir / "study.journal")
    same = (where == own if kind == "url" or "://" in own else Path(where).resolve() == Path(own).resolve())
    if same and name == study_name:
        raise RecipeError(f"sweep.warm_start: {cfg.warm_start} with study {name!r} is this sweep's own study; "
                          "re-run the sweep to resume it, or name the earlier study with sweep.warm_start_study")
    return open_storage(str(where), sweep_dir), name, f"{cfg.warm_start} (study {name})"
