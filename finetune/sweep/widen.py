"""Widening a sweep: new values in a choice list, a wider range, a new key, without losing its trials.

Why a new study: Optuna fixes a categorical parameter's choices for the whole study (storages refuse
new choices), and its samplers model only the trials whose distributions equal the current ones (the
intersection search space), so a study can't be widened in place. Its trials are re-expressed in the
new distributions and copied, with their numbers and attributes, into ``<name>.widened-K``; the
earlier study then points to it (``WIDENED_TO``). Nothing is changed before that last step, so a
widening that stops midway leaves the earlier study as it was.

A new key's earlier trials count as having had the recipe's value for it, which must lie in the new
distribution. Narrowing (a value, range end or key removed) or a change of anything else is refused.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from finetune.config import RecipeError
from finetune.sweep.space import (
    ParamSpec,
    complete,
    covers,
    describe,
    distribution,
    express,
    recipe_values,
    settings_of,
)
from finetune.sweep.trials import (
    CONFIG,
    WARM_FROM,
    WIDENED_TO,
    WIDENINGS,
    current_study,
)

log = logging.getLogger("finetune.sweep")
HINT = ("use a new sweep.dir / sweep.study (with sweep.warm_start=<the earlier sweep folder> to start from its "
        "results), or the same settings to resume it")


def specs(dumped: dict[str, Any]) -> dict[str, ParamSpec]:
    """A fingerprint's parameters as specs again."""
    return {key: ParamSpec.model_validate(spec) for key, spec in dumped.items()}


def plan(saved: dict, fingerprint: dict, name: str) -> list[str]:
    """What the new search widens, one line per parameter.

    Raises:
        RecipeError: anything but the parameters changed, or a parameter was narrowed or removed.
    """
    other = sorted(k for k in set(saved) | set(fingerprint) if k != "parameters" and saved.get(k) != fingerprint.get(k))
    if other:
        raise RecipeError(f"study {name!r} was started with a different {', '.join(other)}; {HINT}")
    old, new = specs(saved["parameters"]), specs(fingerprint["parameters"])
    problems = [f"{key} was removed" for key in old if key not in new]
    changes = []
    for key, spec in new.items():
        if key not in old:
            changes.append(f"{key}: new, {describe(spec)}")
        elif spec != old[key]:
            why = covers(old[key], spec)
            if why:
                problems.append(f"{key}: {why}")
            else:
                changes.append(f"{key}: {describe(old[key])} -> {describe(spec)}")
    if problems:
        raise RecipeError(f"study {name!r} was started with different parameters, which the new ones don't widen: "
                          f"{'; '.join(problems)}. A sweep can be widened (new choices, wider ranges, new keys), "
                          f"not narrowed: {HINT}")
    return changes


def widen(storage: optuna.storages.BaseStorage, name: str, fingerprint: dict,
          pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """Copy the sweep's current study into a new one in the widened space; returns the new study.
    Call it with the sweep folder's lock held, once stale trials are recovered.

    Raises:
        RecipeError: not a widening (see ``plan``), a trial still running, or a new key whose recipe
            value lies outside its distribution.
    """
    old = current_study(storage, name, pruner)
    saved = old.user_attrs[CONFIG]
    if saved == fingerprint:  # another worker of this folder widened it meanwhile
        return old
    changes = plan(saved, fingerprint, old.study_name)
    running = old.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running:
        raise RecipeError(f"can't widen study {old.study_name!r} while trial {running[0].number} runs (worker "
                          f"{running[0].user_attrs.get('worker', '?')}); widen it once its workers have stopped")
    carry = _Carry(old.study_name, specs(saved["parameters"]), specs(fingerprint["parameters"]),
                   recipe_values(fingerprint["recipe"]))
    copies = [copy for trial in old.get_trials(deepcopy=False) if (copy := carry(trial)) is not None]
    history = [*old.user_attrs.get(WIDENINGS, []), {"from": old.study_name, "changes": changes,
                                                    "at": datetime.datetime.now().isoformat(timespec="seconds")}]
    new = _create(storage, f"{name}.widened-{len(history)}", old, pruner)
    if new is None:  # another machine's worker widened it first
        return current_study(storage, name, pruner)
    for key, value in old.user_attrs.items():
        new.set_user_attr(key, value)
    new.set_user_attr(WIDENINGS, history)
    new.set_user_attr(CONFIG, fingerprint)
    new.add_trials(copies)
    old.set_user_attr(WIDENED_TO, new.study_name)  # last: until now the earlier study is untouched
    kept = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) and WARM_FROM not in t.user_attrs for t in copies)
    log.info("sweep widened (%s): its %d finished trials are kept, re-expressed in the new space, in study %s%s",
             "; ".join(changes), kept, new.study_name,
             f"; {carry.dropped} trials lent by a warm start no longer fit and were left out" if carry.dropped else "")
    return new


class _Carry:
    """Re-expresses one trial of the earlier study in the widened space."""

    def __init__(self, study_name: str, old: dict[str, ParamSpec], new: dict[str, ParamSpec], ran_on):
        self.study_name, self.old, self.new, self.ran_on = study_name, old, new, ran_on
        self.dropped = 0

    def __call__(self, trial: FrozenTrial) -> FrozenTrial | None:
        lent = WARM_FROM in trial.user_attrs
        params = self._params(trial, trial.params, lent)
        if params is None:
            self.dropped += 1
            return None
        system = dict(trial.system_attrs)
        if system.get("fixed_params"):  # a waiting slot's settings (a grid point, a retry, settings tried first)
            system["fixed_params"] = self._params(trial, system["fixed_params"], lent, strict=False) or {}
        return FrozenTrial(number=trial.number, state=trial.state, value=None, values=trial.values,
                           datetime_start=trial.datetime_start, datetime_complete=trial.datetime_complete,
                           params=params, distributions={k: distribution(self.new[k]) for k in params},
                           user_attrs=dict(trial.user_attrs), system_attrs=system,
                           intermediate_values=dict(trial.intermediate_values), trial_id=trial._trial_id)

    def _params(self, trial: FrozenTrial, params: dict, lent: bool, strict: bool = True) -> dict | None:
        settings = settings_of(params, self.old)
        if complete(params, self.old):
            # a lent trial ran on another recipe, whose value for a new key is unknown here
            full, why = express(settings, self.new, None if lent else self.ran_on)
            if full is not None:
                return full
            if lent:
                return None
            if strict and trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
                raise RecipeError(f"can't widen study {self.study_name!r}: its earlier trials ran with the recipe's "
                                  f"value of each new parameter, and for trial {trial.number} {why}; include that value "
                                  f"in the new parameter's choices or range, or {HINT}")
        return express(settings, self.new, partial=True)[0]


def _create(storage, new_name: str, old: optuna.Study, pruner) -> optuna.Study | None:
    """The new study; None when another worker's widening finished first."""
    try:
        return optuna.create_study(storage=storage, study_name=new_name, direction=old.direction, pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        pass
    # a widening that stopped before its last step left it, or one on another machine is under way
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if old.user_attrs.get(WIDENED_TO):
            return None
        time.sleep(1.0)
    log.warning("study %s was left by a widening that did not finish: it is replaced", new_name)
    optuna.delete_study(study_name=new_name, storage=storage)
    return optuna.create_study(storage=storage, study_name=new_name, direction=old.direction, pruner=pruner)
