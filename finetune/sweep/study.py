"""The Optuna study behind a sweep: storage, samplers, pruners, trial slots and heartbeats.

Why slots: ``n_trials`` is the size of the study, not of one invocation, and several workers
may share a study. The worker that creates the study enqueues ``n_trials`` waiting trials (for a
grid, each holds its combination); workers pop them atomically (Optuna's own enqueue/pop), so
every slot runs exactly once, re-running a command never adds trials, and a grid continues
where it stopped.

Why our own heartbeat: Optuna's heartbeat only covers ``study.optimize`` on RDB storages; a
sweep runs trials with ask/tell and defaults to the journal file. A thread records a
timestamp on the running trial; a trial silent for three beats is failed and its settings
re-queued, once, by whichever worker notices first.

Creating a study may start it warm (``warm``: an earlier sweep's trials lent to the sampler, its best
settings in the first slots); joining one with a wider search widens it (``widen``: its trials copied,
re-expressed, into a new study the old one points to); any other change of the search is refused.

Default storage: Optuna's journal file (``study.journal`` in the sweep folder). It is an
append-only log with a file lock, so a crash can't corrupt it and several local worker
processes write to it without SQLite's "database is locked".
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from finetune.config import RecipeError
from finetune.sweep import widen
from finetune.sweep.config import SweepConfig
from finetune.sweep.space import grid_points
from finetune.sweep.storage import open_storage  # noqa: F401 - also read from here
from finetune.sweep.trials import (
    CONFIG,
    SLOTS,
    WARM_START,
    WIDENED_TO,
    current_study,
    own_trials,
)

if TYPE_CHECKING:
    from finetune.sweep.warm import WarmStart

HEARTBEAT = "finetune:heartbeat"
log = logging.getLogger("finetune.sweep")


def make_sampler(cfg: SweepConfig, seed: int) -> optuna.samplers.BaseSampler:
    if cfg.method in ("grid", "random"):  # grid trials carry their combination; the sampler is unused
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.method == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=cfg.guided_after())
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.guided_after(), multivariate=True,
                                      group=any(s.when for s in cfg.parameters.values()))


class BudgetMedianPruner(optuna.pruners.BasePruner):
    """The median rule at equal shares of each trial's own budget: a trial reports its validations at per-mille
    of its optimizer steps, and its best value so far is compared with the median of the finished trials' best
    values up to the same share (their validations need not fall on the same per-mille). ``warmup_steps`` is
    applied by the sweep in optimizer steps, before it asks."""

    def __init__(self, n_startup_trials: int):
        self.n_startup_trials = n_startup_trials

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        at = trial.last_step
        finished = own_trials(study, (TrialState.COMPLETE,))
        if at is None or len(finished) < max(self.n_startup_trials, 1):
            return False
        best = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min

        def best_until(values: dict[int, float]) -> float | None:
            seen = [v for step, v in values.items() if step <= at and not math.isnan(v)]
            return best(seen) if seen else None

        own = best_until(trial.intermediate_values)
        theirs = [v for t in finished if (v := best_until(t.intermediate_values)) is not None]
        if own is None or not theirs:
            return False
        median = statistics.median(theirs)
        return own < median if best is max else own > median


class FirstEvaluationHyperband(optuna.pruners.HyperbandPruner):
    """Optuna's Hyperband with ``min_resource="auto"``: the first evaluation's step of the finished trials (Optuna's
    own takes only a number there). Like its ``max_resource="auto"``, it is settled once a trial finishes; until
    then nothing is pruned."""

    def _try_initialization(self, study: optuna.Study) -> None:
        if self._min_resource == "auto":
            firsts = [min(t.intermediate_values) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                      if t.intermediate_values]
            if not firsts:
                return
            self._min_resource = max(1, min(firsts))
        super()._try_initialization(study)


def make_pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    p = cfg.pruner
    if p.kind == "median" and p.compare == "budget":
        return BudgetMedianPruner(n_startup_trials=p.startup_trials)
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps)
    if p.kind == "hyperband":
        return FirstEvaluationHyperband(min_resource=p.min_resource or "auto", max_resource=p.max_resource or "auto",
                                        reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def direction(cfg: SweepConfig, metric: str) -> str:
    from finetune.metrics import greater_is_better

    if cfg.objective.direction:
        return cfg.objective.direction
    return "maximize" if greater_is_better(metric) else "minimize"


def open_study(cfg: SweepConfig, storage, name: str, direction_: str, fingerprint: dict, sweep_dir: Path,
               warm_start: Callable[[], WarmStart] | None = None, first: list[dict] = ()) -> optuna.Study:
    """Create the study and its slots (after a warm start's lent trials and first settings), join an
    existing one with the same search, or widen it (see ``widen``) when the search is wider. ``first``:
    settings (params of this space) a new study tries before any other, ahead of a warm start's.

    Raises:
        RecipeError: the study exists with another objective, base recipe or a narrower space; the warm
            start's source can't be used.
    """
    pruner = make_pruner(cfg)
    study = current_study(storage, name, pruner)
    if study is None:
        start = warm_start() if warm_start else None  # before creating anything: a bad source leaves no study
        try:
            study = optuna.create_study(storage=storage, study_name=name, direction=direction_, pruner=pruner)
        except optuna.exceptions.DuplicatedStudyError:
            study = current_study(storage, name, pruner)
        else:
            study.set_user_attr(CONFIG, fingerprint)
            total = _enqueue_slots(study, cfg, first=[*first, *(start.first if start else [])])
            if start:
                start.lend(study)
            study.set_user_attr(SLOTS, total)
            return study
    saved = _wait_for(lambda: study.user_attrs.get(CONFIG))
    if saved != fingerprint:
        widen.plan(saved, fingerprint, study.study_name)  # refuses what is not a widening before touching anything
        recover_stale(study, cfg.heartbeat_seconds, sweep_dir)
        with sweep_lock(sweep_dir):
            study = widen.widen(storage, name, fingerprint, pruner)
        if study.user_attrs.get(CONFIG) != fingerprint:
            raise RecipeError(f"study {name!r} was just widened by another worker, to another space; run that "
                              f"worker's settings, or {widen.HINT}")
    if study.direction.name.lower() != direction_:
        raise RecipeError(f"study {name!r} optimises in direction {study.direction.name.lower()}, not {direction_}")
    # until the creator has enqueued every slot, "nothing waiting" would wrongly mean "all done"
    _wait_for(lambda: study.user_attrs.get(SLOTS))
    if warm_start and not study.user_attrs.get(WARM_START):
        log.warning("sweep.warm_start is not used: study %s already exists (a warm start applies when a study "
                    "is created)", study.study_name)
    total = _enqueue_slots(study, cfg)
    if total > study.user_attrs.get(SLOTS, 0):
        study.set_user_attr(SLOTS, total)
    return study


def _enqueue_slots(study: optuna.Study, cfg: SweepConfig, first: list[dict] = ()) -> int:
    """Enqueue the trials the study is missing (all of them when new; more when n_trials grew or a
    widened grid has new points); ``first``: settings to try before the others. Returns the slot count.

    A grid's new slots take the points no trial holds yet, in grid order: after a widening, the
    earlier points keep their trials and only the new ones are queued.
    """
    total = cfg.trials_total()
    have = study.user_attrs.get(SLOTS, 0)
    if total <= have:
        return have
    if cfg.method == "grid":
        held = {_point_key({**t.system_attrs.get("fixed_params", {}), **t.params}) for t in own_trials(study)}
        points = list({_point_key(p): p for p in [*first, *grid_points(cfg.parameters)]
                       if _point_key(p) not in held}.values())
    else:
        points = [*first, *[{}] * total]
    firsts = {_point_key(p) for p in first}
    for slot, point in zip(range(have, total), points):
        attrs = {"slot": slot, **({"warm_start_first": True} if point and _point_key(point) in firsts else {})}
        study.enqueue_trial(point, user_attrs=attrs, skip_if_exists=False)
    return total


def _point_key(point: dict) -> str:
    return json.dumps(point, sort_keys=True, default=str)


def _wait_for(read, seconds: float = 60.0):
    """A worker joining a study its creator is still setting up waits for the setting to appear."""
    deadline = time.monotonic() + seconds
    while (value := read()) is None:
        if time.monotonic() > deadline:
            raise RecipeError("the study exists but its creator never finished setting it up; delete it or use a new name")
        time.sleep(0.5)
    return value


class Heartbeat:
    """Records a timestamp on a running trial every ``interval`` seconds, from a thread."""

    def __init__(self, study: optuna.Study, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = study._storage, trial_id, interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{trial_id}")

    def _beat(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a storage hiccup must not kill the trial
                self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT, time.time())
            if self.stopped.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:  # noqa: PYI034
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path):
    """Serialises stale-trial recovery and best/ updates among workers sharing a sweep folder (a
    journal file can't tell two workers' state changes apart; RDB storages refuse the second one)."""
    with open(sweep_dir / ".recovery.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def recover_stale(study: optuna.Study, interval: float, sweep_dir: Path) -> list[int]:
    """Fail running trials whose worker died (no heartbeat for 3 intervals) and re-queue their
    settings into the same slot. Returns the numbers of the trials recovered."""
    recovered = []
    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = trial.system_attrs.get(HEARTBEAT) or trial.datetime_start.timestamp()
        if time.time() - last < 3 * interval:
            continue
        with sweep_lock(sweep_dir):
            fresh = storage.get_trial(trial._trial_id)
            if fresh.state != TrialState.RUNNING or fresh.system_attrs.get(HEARTBEAT, last) != last:
                continue
            try:  # attributes can't change once a trial has finished: the reason goes first
                storage.set_trial_user_attr(trial._trial_id, "error", f"its worker stopped (no heartbeat for "
                                            f"{time.time() - last:.0f} s); the settings were queued again")
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue
            study.enqueue_trial(trial.params, user_attrs={"slot": trial.user_attrs.get("slot"),
                                                          "retry_of": trial.number}, skip_if_exists=False)
        recovered.append(trial.number)
    return recovered


def pop_trial(study: optuna.Study, cfg: SweepConfig) -> optuna.Trial | None:
    """The next waiting slot, or None when none is left.

    ``Study.ask`` creates a new trial when none is waiting, which would add a trial beyond
    n_trials when two workers race for the last slot; this is ask's own code without that.
    The sampler is seeded with the trial's number: the same seed proposes the same settings,
    a resumed sweep doesn't repeat its first proposals, and two workers don't propose alike.
    """
    study._thread_local.cached_all_trials = None
    if after := study.user_attrs.get(WIDENED_TO):
        log.warning("study %s was widened into %s by another worker: this worker, with the earlier space, starts "
                    "no new trial; run the widened sweep", study.study_name, after)
        return None
    trial_id = study._pop_waiting_trial_id()
    if trial_id is None:
        return None
    study.sampler = make_sampler(cfg, cfg.seed * 100_003 + study._storage.get_trial_number_from_id(trial_id))
    return optuna.Trial(study, trial_id)
