"""sweep.budget: what earlier runs of a sweep spent, and what a trial can still do in what is left.

A budget counts wall time over every run of a sweep folder (``RunSpan``s recorded in the study), so a
resumed sweep has what is left. No trial starts with less left than the shortest trial so far took;
with ``sweep.fill_budget``, time too short for a whole trial goes to a trial on a shortened schedule
(``fitted_schedule``) instead of idling or starting a whole schedule the deadline would cut.
"""

from __future__ import annotations

import math
import time
import uuid

import optuna
from optuna.trial import TrialState

from finetune.sweep import study as studies
from finetune.sweep.trials import own_trials

FILL_SHARE = 1 / 3  # the least share of the full schedule a filling trial trains: Hyperband's (factor 3) first cut
# a filling trial plans to end by this share of the time left: machines drift (one MRPC job here ran its second
# trial 13 % slower per step than its first, and the deadline cut it at step 335 of 381)
FILL_MARGIN = 0.85


RUN_SPAN = "run_span:"  # study attribute prefix: one run's [first, last] wall-clock time.time()


class RunSpan:
    """One run of a sweep, recorded in its study as [started, last seen] in wall-clock seconds.

    sweep.budget counts these spans, not the trials' own seconds: the time between trials (sampling, loading,
    bookkeeping) is spent too, and a resumed run must not start a trial the first run had no time left for.
    """

    def __init__(self, study: optuna.Study):
        self.study, self.key, self.started = study, f"{RUN_SPAN}{uuid.uuid4().hex[:12]}", time.time()
        self.mark()

    def mark(self) -> None:
        self.study.set_user_attr(self.key, [self.started, time.time()])


def spent_seconds(study: optuna.Study) -> float:
    """Wall time the earlier runs of this sweep took (what sweep.budget counts as spent).

    The union of the runs' spans (parallel workers overlap, so their spans are merged, not added) and of each
    trial's time from its start to its last heartbeat (a worker killed mid-trial last marked its span when its
    previous trial ended), plus the seconds of trials that finished before the first recorded span (studies
    from before spans were kept).
    """
    spans = [tuple(v) for k, v in study.user_attrs.items() if k.startswith(RUN_SPAN)]
    since = min((first for first, _ in spans), default=float("inf"))
    beats = [(t.datetime_start.timestamp(), t.system_attrs[studies.HEARTBEAT]) for t in own_trials(study)
             if t.datetime_start and t.datetime_start.timestamp() >= since and studies.HEARTBEAT in t.system_attrs]
    covered, end = 0.0, float("-inf")
    for first, last in sorted(spans + beats):
        covered += max(0.0, last - max(first, end))
        end = max(end, last)
    return covered + sum(t.user_attrs.get("seconds", 0.0) for t in own_trials(study, (
        TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
        if t.user_attrs.get("duplicate_of") is None and t.datetime_start and t.datetime_start.timestamp() < since)


def shortest_trial(study: optuna.Study, whole: bool = False) -> float | None:
    """Seconds of this sweep's shortest finished or pruned trial (a pruned one reached a first rung); ``whole``:
    of its shortest trial that trained its whole schedule (completed, not cut by the deadline or shortened)."""
    states = (TrialState.COMPLETE,) if whole else (TrialState.COMPLETE, TrialState.PRUNED)
    seconds = [t.user_attrs["seconds"] for t in own_trials(study, states)
               if t.user_attrs.get("seconds") and t.user_attrs.get("duplicate_of") is None
               and not (whole and (t.user_attrs.get("stopped_at_deadline") or t.user_attrs.get("shortened")))]
    return min(seconds) if seconds else None


def after_training_seconds(study: optuna.Study) -> float:
    """The median time a completed trial of this sweep spent after its training loop (test, export, bookkeeping)."""
    tails = sorted((t.user_attrs.get("time_split") or {}).get("other", 0.0) + (t.user_attrs.get("time_split") or {})
                   .get("test", 0.0) for t in own_trials(study, (TrialState.COMPLETE,)) if t.user_attrs.get("time_split"))
    return max(0.0, tails[len(tails) // 2]) if tails else 0.0


def fitted_schedule(study: optuna.Study, seconds: float, repeats: int = 1) -> tuple[int, int] | None:
    """(optimizer steps, the full schedule's steps) for a trial of ``repeats`` runs that must end within
    ``seconds``; None when that is less than ``FILL_SHARE`` of the full schedule, or nothing completed yet.

    Timed conservatively from the completed trials: the most seconds any spent outside training and evaluation
    (setup, feature cache, test, export) are fixed, the most seconds any spent per optimizer step on training
    and evaluation scale, and the plan ends at ``FILL_MARGIN`` of ``seconds``. A faster trial (LoRA, frozen
    layers) then ends early, which leaves time idle but keeps the budget; a slower one is stopped by the
    deadline, as any trial is.
    """
    done = [t.user_attrs for t in own_trials(study, (TrialState.COMPLETE,))
            if t.user_attrs.get("optimizer_steps") and t.user_attrs.get("duplicate_of") is None]
    if not done:
        return None
    fixed, per_step, full = 0.0, 0.0, 0
    for attrs in done:
        runs = len(attrs.get("values") or [None])  # a trial with repeats records one value per run
        moving = attrs["train_seconds"] + (attrs.get("time_split") or {}).get("evaluate", 0.0)
        fixed = max(fixed, (attrs["seconds"] - moving) / runs)
        per_step = max(per_step, moving / attrs["optimizer_steps"])
        cut = attrs.get("stopped_at_deadline") or attrs.get("shortened")  # {"of": the schedule it was cut from}
        full = max(full, cut["of"] if cut else attrs["optimizer_steps"] // runs)
    steps = math.floor((FILL_MARGIN * seconds / repeats - fixed) / per_step) if per_step > 0 else 0
    return (steps, full) if FILL_SHARE * full <= steps < full else None
