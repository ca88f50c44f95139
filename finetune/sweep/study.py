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

Default storage: Optuna's journal file (``study.journal`` in the sweep folder). It is an
append-only log with a file lock, so a crash can't corrupt it and several local worker
processes write to it without SQLite's "database is locked".
"""

from __future__ import annotations

import contextlib
import fcntl
import random
import threading
import time
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from finetune.config import RecipeError
from finetune.sweep.config import SweepConfig
from finetune.sweep.space import grid_points

HEARTBEAT = "finetune:heartbeat"
SLOTS = "finetune:slots"
CONFIG = "finetune:sweep"


def open_storage(url: str | None, sweep_dir: Path) -> optuna.storages.BaseStorage:
    if url is None:
        return JournalStorage(JournalFileBackend(str(sweep_dir / "study.journal")))
    if "://" in url:
        # Workers starting together on a fresh database race to create Optuna's tables; the loser
        # gets a unique-constraint error and succeeds on a second try, once the tables exist.
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
            except Exception as err:  # noqa: BLE001 - sqlalchemy and driver errors vary; name the URL
                if attempt < 4 and "IntegrityError" in type(err).__name__ + str(err):
                    time.sleep(0.5 + random.random())
                    continue
                raise RecipeError(f"sweep.storage: cannot open {url!r}: {type(err).__name__}: {err}") from None
    return JournalStorage(JournalFileBackend(url))


def make_sampler(cfg: SweepConfig, seed: int) -> optuna.samplers.BaseSampler:
    if cfg.method in ("grid", "random"):  # grid trials carry their combination; the sampler is unused
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.method == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=cfg.guided_after())
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.guided_after(), multivariate=True,
                                      group=any(s.when for s in cfg.parameters.values()))


def make_pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    p = cfg.pruner
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps)
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource or "auto", max_resource=p.max_resource or "auto",
                                              reduction_factor=p.reduction_factor)
    return optuna.pruners.NopPruner()


def direction(cfg: SweepConfig, metric: str) -> str:
    from finetune.metrics import greater_is_better

    if cfg.objective.direction:
        return cfg.objective.direction
    return "maximize" if greater_is_better(metric) else "minimize"


def open_study(cfg: SweepConfig, storage, name: str, direction_: str, fingerprint: dict) -> optuna.Study:
    """Create the study and its slots, or join an existing one with the same search.

    Raises:
        RecipeError: the study exists with another search space, objective or base recipe.
    """
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=direction_, pruner=make_pruner(cfg))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, pruner=make_pruner(cfg))
        created = False
    if created:
        study.set_user_attr(CONFIG, fingerprint)
    else:
        saved = _wait_for(lambda: study.user_attrs.get(CONFIG))
        if saved != fingerprint:
            changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
            raise RecipeError(f"study {name!r} was started with a different {', '.join(changed)}; use a new "
                              "sweep.dir / sweep.study, or the same settings to resume it")
        if study.direction.name.lower() != direction_:
            raise RecipeError(f"study {name!r} optimises in direction {study.direction.name.lower()}, not {direction_}")
        # until the creator has enqueued every slot, "nothing waiting" would wrongly mean "all done"
        _wait_for(lambda: study.user_attrs.get(SLOTS))
    _add_slots(study, cfg)
    return study


def _add_slots(study: optuna.Study, cfg: SweepConfig) -> None:
    """Enqueue the trials the study is missing (all of them when new; more when n_trials grew)."""
    total = cfg.trials_total()
    have = study.user_attrs.get(SLOTS, 0)
    fixed = grid_points(cfg.parameters)[:total] if cfg.method == "grid" else [{}] * total
    for slot in range(have, total):
        study.enqueue_trial(fixed[slot], user_attrs={"slot": slot}, skip_if_exists=False)
    if total > have:
        study.set_user_attr(SLOTS, total)


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
    trial_id = study._pop_waiting_trial_id()
    if trial_id is None:
        return None
    study.sampler = make_sampler(cfg, cfg.seed * 100_003 + study._storage.get_trial_number_from_id(trial_id))
    return optuna.Trial(study, trial_id)
