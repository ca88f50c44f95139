"""Which study is a sweep's, and which of its trials are the sweep's own.

A widened sweep lives in a new study (``<name>.widened-K``) that the earlier one points to; a
warm-started sweep holds finished trials lent by an earlier sweep for its sampler only. Everything
that lists a sweep's trials (the runner, best/, keep_top_k, the report) goes through ``own_trials``.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

CONFIG = "finetune:sweep"
"""Study attribute: the fingerprint of the search (base recipe, parameters, method, metric, repeats)."""
SLOTS = "finetune:slots"
"""Study attribute: how many trial slots have been enqueued (n_trials of the study)."""
WARM_START = "finetune:warm_start"
"""Study attribute: where a warm start came from, how many trials it lent, what was tried first."""
WIDENINGS = "finetune:widenings"
"""Study attribute: each widening that led to this study (from which study, what changed)."""
WIDENED_TO = "finetune:widened_to"
"""Study attribute of a widened study: the study that holds its trials now."""
WARM_FROM = "warm_start_from"
"""Trial attribute: this trial was lent by an earlier sweep (where from); it is not the sweep's own."""


def own_trials(study: optuna.Study, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
    """The sweep's own trials: not those an earlier sweep lent the sampler."""
    return [t for t in study.get_trials(deepcopy=False, states=states) if WARM_FROM not in t.user_attrs]


def lent_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if WARM_FROM in t.user_attrs]


def current_study(storage: optuna.storages.BaseStorage, name: str,
                  pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study | None:
    """The study named ``name``, or the widened study that holds its trials now; None if there is none."""
    try:
        study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
    except KeyError:
        return None
    seen = {name}
    while (after := study.user_attrs.get(WIDENED_TO)) and after not in seen:
        seen.add(after)
        study = optuna.load_study(study_name=after, storage=storage, pruner=pruner)
    return study
