"""Running a sweep: pop a trial slot, turn its settings into overrides, train a fresh recipe run,
report each validation to the pruner, record the trial, keep the disk within budget.

    SWEEP_DIR/
      sweep.yaml        the base recipe and the sweep section
      study.journal     the Optuna study (default storage)
      sweep.log         one line per trial
      trials/0003/      a run folder per trial (seed-K/ subfolders when repeats > 1)
      best/             the best trial's run folder (hard links), loads like any run
      report/           trials.csv, trials.json, report.md, plots (PNG and HTML)

Under ``accelerate launch --num_processes N`` the main process talks to the study and
broadcasts each trial's overrides; every process trains the trial together and they take
each pruning decision the main process broadcasts.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import shlex
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import psutil
import torch
import yaml
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from optuna.trial import TrialState

from finetune import runs
from finetune.config import RecipeConfig, RecipeError
from finetune.errors import Interrupted
from finetune.processes import command_logging, multi_process_without_accelerator
from finetune.reuse import reuse, sharing
from finetune.runs import remove_checkpoints, remove_model
from finetune.sweep import study as studies
from finetune.sweep.budget import (
    RunSpan,
    after_training_seconds,
    fitted_schedule,
    shortest_trial,
    spent_seconds,
)
from finetune.sweep.config import SweepConfig
from finetune.sweep.folder import SweepFolder, run_folders
from finetune.sweep.space import format_override, suggest, to_overrides
from finetune.sweep.trials import own_trials
from finetune.sweep.warm import load_warm_start
from finetune.techniques import run_recipe

log = logging.getLogger("finetune.sweep")
# What a trial folder keeps when its model is removed to stay within keep_top_k


@dataclass
class SweepResult:
    sweep_dir: Path
    study_name: str
    metric: str
    direction: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    """One row per trial, as in report/trials.json."""
    best_trial: int | None = None
    best_value: float | None = None
    best_params: list[str] = field(default_factory=list)
    """The best trial's overrides, e.g. ['train.lr=0.0003', 'policy.lora.rank=16']."""
    best_run_dir: Path | None = None
    """``<sweep_dir>/best``: the best trial's run folder; None when that trial ran in another worker's
    sweep folder (see ``note``)."""
    here_trial: int | None = None
    """The trial whose model ``<sweep_dir>/best`` holds: the best one this sweep folder ran."""
    here_value: float | None = None
    """Its validation value (the study's best may be better: see ``note``)."""
    note: str | None = None
    """Set when the study's best trial ran elsewhere: where it ran, and what best/ here holds instead."""
    spent_before: float = 0.0
    """Wall seconds earlier runs of this sweep had taken (what sweep.budget counted as spent)."""
    recipe_class: type[RecipeConfig] = field(default=RecipeConfig, repr=False)
    """The swept recipe's class: ``best_recipe`` is one too (``finetune.Recipe`` can ``run()``)."""

    @property
    def best_recipe(self) -> RecipeConfig | None:
        return self.recipe_class.from_yaml(self.best_run_dir / runs.RECIPE) if self.best_run_dir else None


def run_sweep(recipe: RecipeConfig, cfg: SweepConfig) -> SweepResult:
    """Run (or resume, or join) the sweep; returns its trials and best run once no slot is left.

    Raises:
        RecipeError: invalid search space, objective or storage; a study with other settings.
    """
    return Sweep(recipe, cfg).run()


class Sweep:
    def __init__(self, recipe: RecipeConfig, cfg: SweepConfig):
        from finetune.sweep.preset import resolve

        cfg = resolve(recipe, cfg)  # sweep.preset fills in the space, method and pruner
        self.recipe, self.cfg = recipe, cfg
        self.metric = cfg.objective.metric or recipe.eval.primary
        if self.metric != "loss" and self.metric not in recipe.eval.metrics:
            raise RecipeError(f"sweep.objective.metric={self.metric!r} is not computed; add it to eval.metrics "
                              f"{recipe.eval.metrics} or use 'loss'")
        self.direction = studies.direction(cfg, self.metric)
        _check_values(recipe, cfg)
        self.sweep_dir = Path(cfg.dir or recipe.output.dir or runs.output_home() / "sweeps" / recipe.name)
        self.study_name = cfg.study or recipe.name
        # trials record where their folders are: workers on other machines keep theirs in their own sweep folders
        self.folder = SweepFolder(self.sweep_dir, self.study_name, self.direction,
                                  f"{socket.gethostname()}:{self.sweep_dir.resolve()}", cfg.keep_top_k)
        # the process group, for broadcasting trials; each trial's Run builds its own Accelerator on it
        self.state = PartialState(cpu=multi_process_without_accelerator())
        self.study: optuna.Study | None = None
        self.trial: optuna.Trial | None = None  # the main process's current trial (other ranks get its overrides)
        self.deadline: float | None = None  # sweep.budget: the time.monotonic() at which the search ends
        self.spent_before = 0.0  # wall seconds earlier runs of this sweep took

    # --- the loop ---------------------------------------------------------------

    def run(self) -> SweepResult:
        from finetune.sweep.report import write_report

        if self.state.is_main_process:
            self._open()
        started = time.monotonic()
        if self.state.is_main_process:
            self.spent_before = spent_seconds(self.study)
            span = RunSpan(self.study)  # this run's wall time, for the budget of later runs
        if self.cfg.budget and self.state.is_main_process:
            spent = self.spent_before
            self.deadline = started + self.cfg.budget - spent
            log.info("budget %.0f s: %.0f s spent by earlier runs of this sweep, %.0f s left", self.cfg.budget, spent,
                     max(0.0, self.cfg.budget - spent))
        try:
            with sharing():  # the trials of this process read the backbone and tokenise the data once
                while True:
                    message = [None]
                    if self.state.is_main_process:
                        message[0] = self._next_trial(started)
                        if message[0] == "wait":  # other workers' trials are running: wait for them or their death
                            time.sleep(self.cfg.heartbeat_seconds)
                            continue
                    if self.state.num_processes > 1:
                        broadcast_object_list(message)
                    if message[0] is None:
                        break
                    left = message[0].pop("seconds_left")  # each process turns it into a deadline on its own clock
                    self._run_trial(**message[0], deadline=None if left is None else time.monotonic() + left)
                    if self.state.is_main_process:
                        span.mark()
        finally:
            if self.state.is_main_process:
                span.mark()  # an interrupted run's time is spent too
        if not self.state.is_main_process:
            return SweepResult(self.sweep_dir, self.study_name, self.metric, self.direction,
                               recipe_class=type(self.recipe))
        with studies.sweep_lock(self.sweep_dir):
            self.folder.update_best(self.study)
        rows = write_report(self.study, self.sweep_dir, self.cfg, self.metric)
        result = self._result(rows)
        if result.note:
            log.warning(result.note)
        return result

    def _open(self) -> None:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        command_logging("sweep", file=self.sweep_dir / "sweep.log", logger=log)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # we print one line per trial ourselves
        storage = studies.open_storage(self.cfg.storage, self.sweep_dir)
        base = self.recipe.to_dict()
        base.pop("output")
        for key in ("cpu_threads", "log_every"):  # how a worker runs, not what it trains
            base["train"].pop(key)
        fingerprint = {"recipe": base, "parameters": {k: v.model_dump(exclude_defaults=True)
                                                      for k, v in self.cfg.parameters.items()},
                       "method": self.cfg.method, "metric": self.metric, "repeats": self.cfg.repeats}
        fingerprint = json.loads(json.dumps(fingerprint))
        warm = (lambda: load_warm_start(self.cfg, fingerprint, self.direction, self.sweep_dir, self.study_name)
                ) if self.cfg.warm_start else None
        from finetune.sweep.preset import recipe_first

        self.study = studies.open_study(self.cfg, storage, self.study_name, self.direction, fingerprint,
                                        self.sweep_dir, warm_start=warm, first=recipe_first(self.recipe, self.cfg))
        self._settle_report_scale()
        sweep_file = {**self.recipe.to_dict(), "sweep": self.cfg.model_dump(mode="json", exclude_defaults=True)}
        (self.sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(sweep_file, sort_keys=False))
        done = len(own_trials(self.study, (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))
        guided = (f", model-guided after {self.cfg.guided_after()} finished trials"
                  if self.cfg.method in ("bayes", "gp") else "")
        log.info("sweep %s: %s search, %d trials (%d done), %s %s on validation%s; folder %s", self.study_name,
                 self.cfg.method, self.cfg.trials_total(), done, self.direction, self.metric, guided, self.sweep_dir)

    def _settle_report_scale(self) -> None:
        """A study keeps one scale for its validations' steps: per-mille of each trial's budget (the median pruner
        comparing by budget) or optimizer steps. A sweep that reported steps (one started before
        sweep.pruner.compare existed, or without a median pruner) goes on with steps."""
        pruner = self.cfg.pruner
        wanted = "budget" if pruner.kind == "median" and pruner.compare == "budget" else "steps"
        scale = self.study.user_attrs.get(REPORT_SCALE)
        if scale is None:
            scale = "steps" if any(t.intermediate_values for t in own_trials(self.study)) else wanted
            self.study.set_user_attr(REPORT_SCALE, scale)
        if pruner.kind == "median" and scale != pruner.compare:
            log.info("sweep.pruner.compare=%s kept from this study's earlier trials (it reported validations by %s); "
                     "a new sweep folder starts with the setting asked for", scale,
                     "optimizer step" if scale == "steps" else "share of each trial's budget")
            self.cfg.pruner = pruner.model_copy(update={"compare": scale})
            self.study.pruner = studies.make_pruner(self.cfg)

    def _next_trial(self, started: float) -> dict | str | None:
        """The next trial's settings; "wait" while only other workers' trials are left; None when done."""
        cfg, study = self.cfg, self.study
        if cfg.timeout and time.monotonic() - started > cfg.timeout:
            log.info("timeout of %.0f s reached; starting no new trial", cfg.timeout)
            return None
        shortened = None  # (steps, of): the schedule of a last trial fitted into what is left of the budget
        if self.deadline is not None:
            left, shortest = self.deadline - time.monotonic(), shortest_trial(study)
            whole = shortest_trial(study, whole=True) if cfg.fill_budget else None
            if whole is not None and 0 < left < whole:  # a whole schedule would be cut short: fit one that ends
                shortened = fitted_schedule(study, left, cfg.repeats)
            if shortened is None and (left <= 0 or (shortest is not None and left < shortest)):
                log.info("budget: %.0f s left, less than the shortest trial so far (%s); starting no new trial",
                         max(left, 0.0), "none" if shortest is None else f"{shortest:.0f} s")
                return None
            if shortened is not None:
                log.info("budget: %.0f s left, less than a whole trial takes (%.0f s); a trial on a schedule "
                         "shortened to %d of %d steps (sweep.fill_budget)", left, whole, *shortened)
        for number in studies.recover_stale(study, cfg.heartbeat_seconds, self.sweep_dir):
            log.info("trial %d: its worker stopped sending heartbeats; its settings are queued again", number)
        finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        trial = studies.pop_trial(study, cfg)
        if trial is None:
            return "wait" if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) else None
        fixed = cfg.method == "grid" or bool({"retry_of", "warm_start_first"} & set(trial.user_attrs))  # not sampled
        try:
            params = suggest(trial, cfg.parameters)
        except Exception as err:  # noqa: BLE001 - a sampler failure fails this trial, not the sweep
            self._finish(trial, TrialState.FAIL, error=f"sampling failed: {type(err).__name__}: {err}")
            return self._next_trial(started)
        guided = cfg.method in ("bayes", "gp") and not fixed and finished >= cfg.guided_after()
        overrides = to_overrides(params, cfg.parameters)
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("guided", guided)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("folder", self.folder.id)
        same = None if fixed else self._completed_with(trial.params)
        if same is not None:  # samplers re-propose settings in small discrete spaces: don't train them twice
            reused = {k: v for k, v in same.user_attrs.items() if k in REUSED_ATTRS}
            self._finish(trial, TrialState.COMPLETE, value=same.value, duplicate_of=same.number, seconds=0.0, **reused)
            log.info("trial %d: same settings as trial %d (%s); its result %.4f is reused, nothing trained",
                     trial.number, same.number, " ".join(overrides), same.value)
            return self._next_trial(started)
        if shortened is not None:  # after the duplicate check: a reused whole trial is better than a shortened one
            overrides = [*overrides, f"train.max_steps={shortened[0]}"]
            trial.set_user_attr("overrides", overrides)
            trial.set_user_attr("shortened", {"steps": shortened[0], "of": shortened[1]})
        self.trial = trial
        # the trial's training stops early enough for what comes after it (export, the model card, bookkeeping)
        left = None if self.deadline is None else self.deadline - time.monotonic() - after_training_seconds(study)
        return {"number": trial.number, "overrides": overrides, "seconds_left": left}

    def _completed_with(self, params: dict) -> optuna.trial.FrozenTrial | None:
        for done in own_trials(self.study, (TrialState.COMPLETE,)):  # a lent trial ran on another recipe
            if done.params == params:
                return done
        return None

    # --- one trial -----------------------------------------------------------------

    def _run_trial(self, number: int, overrides: list[str], deadline: float | None = None) -> None:
        cfg, main = self.cfg, self.state.is_main_process
        trial = self.trial if main else None
        trial_dir = self.sweep_dir / "trials" / f"{number:04d}"
        began = time.monotonic()
        values, results, state, error, stopped = [], [], TrialState.COMPLETE, None, None
        heartbeat = studies.Heartbeat(self.study, trial._trial_id, cfg.heartbeat_seconds) if main else None
        # sweep.test=kept: the run scores test once its validation says keep_top_k will keep it (the study is on
        # the main process only: a multi-process launch scores every trial)
        if cfg.test == "kept" and self.state.num_processes == 1:
            test = lambda validation: self._would_keep(validation[self.metric])  # noqa: E731
        else:
            test = cfg.test != "none"
        try:
            with heartbeat or contextlib.nullcontext():
                for repeat in range(cfg.repeats):
                    run_dir = trial_dir if cfg.repeats == 1 else trial_dir / f"seed-{repeat}"
                    recipe = self._trial_recipe(overrides, run_dir, repeat)
                    result = run_recipe(recipe, overwrite=True, quiet=True,  # the sweep prints a line per trial
                                        on_validation=self._pruning_hook(trial) if repeat == 0 else None,
                                        test=test, deadline=deadline)
                    values.append(result.metrics["validation"][self.metric])
                    if "stopped_at_deadline" in result.metrics:
                        stopped = result.metrics["stopped_at_deadline"]
                    results.append(result)
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except (KeyboardInterrupt, Interrupted):
            if main:  # give the slot back, so re-running the command runs it
                self._finish(trial, TrialState.FAIL, error="interrupted (Ctrl-C)")
                self.study.enqueue_trial(trial.params, user_attrs={"slot": trial.user_attrs.get("slot"),
                                                                   "retry_of": trial.number}, skip_if_exists=False)
            raise Interrupted(f"sweep interrupted (Ctrl-C) during trial {number}; kept: the finished trials (the study "
                              f"has them) and trial {number}'s slot, queued again; go on with: finetune sweep --recipe "
                              f"{shlex.quote(str(self.sweep_dir / 'sweep.yaml'))}") from None
        except Exception as err:  # noqa: BLE001 - NaN, a bad combination, out of memory: record and go on
            state, error = TrialState.FAIL, f"{type(err).__name__}: {err}"
        finally:
            gc.collect()  # the trial's model, optimizer and data loaders go now, not at some later trial
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if not main:
            return
        seconds = time.monotonic() - began
        attrs: dict[str, Any] = {"seconds": round(seconds, 1), "run_dir": str(trial_dir.relative_to(self.sweep_dir)),
                                 "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}  # shows leaks
        value = None
        if state == TrialState.COMPLETE:
            value = statistics.fmean(values)
            best = max(range(len(values)), key=lambda i: values[i] if self.direction == "maximize" else -values[i])
            attrs.update(best_step=results[best].best_step, test=results[best].metrics.get("test"),
                         train_seconds=round(sum(r.metrics["train_seconds"] for r in results), 1),
                         optimizer_steps=sum(r.metrics["optimizer_steps"] for r in results),
                         model_dir=str(results[best].run_dir.relative_to(self.sweep_dir)))
            if cfg.measures_cost():
                try:
                    attrs.update(model_cost(results[best].run_dir))
                except Exception as err:  # noqa: BLE001 - the trial's result stands without its cost
                    log.warning("trial %d: could not measure the model's cost: %s: %s", number, type(err).__name__, err)
            seconds = time.monotonic() - began  # measuring cost is part of the trial's time
            attrs["seconds"] = round(seconds, 1)
            attrs.update(time_split=_time_split(results, seconds))
            if stopped is not None:  # its schedule was cut: the report says so beside its value
                attrs.update(stopped_at_deadline=stopped)
            if len(values) > 1:
                attrs.update(values=values, ci95=_ci95(values))
            if math.isnan(value):
                state, error = TrialState.FAIL, f"the objective {self.metric} is NaN"
        self._finish(trial, state, value=value, error=error, **attrs)
        if self.recipe.output.keep != "all":  # a finished trial's run already went by output.keep; the others
            for folder in run_folders(trial_dir):
                remove_checkpoints(folder)
        if state != TrialState.COMPLETE:  # a pruned or failed trial has no model worth its disk (LoRA's base/)
            for folder in run_folders(trial_dir):
                remove_model(folder, f"trial {number} ended {state.name.lower()} (sweep.keep_top_k)")
        if state == TrialState.COMPLETE:
            with studies.sweep_lock(self.sweep_dir):  # other local workers may be finishing trials too
                self.folder.keep_top_k(self.study)
                self.folder.update_best(self.study)
        best = self.folder.best(self.study)
        log.info("trial %d %s%s in %.0f s | %s%s", number, state.name,
                 f" {self.metric} {value:.4f}" if value is not None and state == TrialState.COMPLETE else "",
                 seconds, " ".join(overrides) or "(base recipe)",
                 f" | best {best.value:.4f} (trial {best.number})" if best else "")
        if error:
            log.info("trial %d error: %s", number, error)

    def _would_keep(self, value: float) -> bool:
        """Whether keep_top_k will keep a trial with this validation value (asked before the trial is recorded)."""
        if self.folder.top_k is None or math.isnan(value):
            return self.folder.top_k is None
        maximize = self.direction == "maximize"
        better = sum(1 for t in own_trials(self.study, (TrialState.COMPLETE,))
                     if self.folder.ran_here(t) and (t.value > value if maximize else t.value < value))
        return better < self.folder.top_k

    def _trial_recipe(self, overrides: list[str], run_dir: Path, repeat: int) -> RecipeConfig:
        recipe = self.recipe.with_overrides(overrides)  # a bad combination raises here and fails the trial
        extra = [f"output.dir={run_dir}", "output.overwrite=true"]
        if self.metric != "loss":  # checkpoint selection follows the objective
            extra.append(f"eval.primary={self.metric}")
        if repeat:
            extra.append(f"train.seed={recipe.train.seed + repeat}")
        return recipe.with_overrides(extra)

    def _pruning_hook(self, trial: optuna.Trial | None):
        """Report each validation (the report plots them); prune when the study's pruner says so,
        decided on the main process for all processes."""

        pruner = self.cfg.pruner
        by_budget = pruner.kind == "median" and pruner.compare == "budget"

        def hook(record: dict) -> None:
            decision = [False]
            if trial is not None:
                value = record.get(self.metric)
                if value is not None and not math.isnan(value):
                    # by budget: at per-mille of the trial's own optimizer steps (see BudgetMedianPruner)
                    trial.report(value, round(1000 * record["budget_fraction"]) if by_budget else record["step"])
                    decision[0] = (not by_budget or record["step"] >= pruner.warmup_steps) and trial.should_prune()
                    if decision[0]:
                        trial.set_user_attr("pruned_at_step", record["step"])
            if self.state.num_processes > 1:
                broadcast_object_list(decision)
            if decision[0]:
                raise optuna.TrialPruned(f"pruned at step {record['step']}")

        return hook

    def _finish(self, trial: optuna.Trial, state: TrialState, value: float | None = None, error: str | None = None,
                **attrs) -> None:
        for key, item in attrs.items():
            trial.set_user_attr(key, item)
        if error:
            trial.set_user_attr("error", error[:2000])
        self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)

    def _result(self, rows: list[dict]) -> SweepResult:
        result = SweepResult(self.sweep_dir, self.study.study_name, self.metric, self.direction, trials=rows,
                             spent_before=self.spent_before,  # a widened sweep's study is <name>.widened-K
                             recipe_class=type(self.recipe))
        best, held = self.folder.best(self.study), self.folder.held_by_best()
        if held is not None:
            result.here_trial, result.here_value = held["trial"], held["value"]
        if best is None:
            return result
        result.best_trial, result.best_value = best.number, best.value
        result.best_params = best.user_attrs.get("overrides", [])
        if held is not None and (held["trial"] == best.number or self.folder.model_here(best)):
            result.best_run_dir = self.sweep_dir / "best"
            return result
        where = best.user_attrs.get("folder") or best.user_attrs.get("worker") or "another worker"
        instead = (f"best/ here holds trial {held['trial']} ({self.metric} {held['value']:.4f}), the best this folder "
                   "ran" if held is not None else "this folder holds no finished trial's model")
        result.note = (f"the study's best trial {best.number} ({self.metric} {best.value:.4f}) ran in another sweep "
                       f"folder ({where}): its model is there, not here; {instead}")
        return result


# --- helpers --------------------------------------------------------------------------

REPORT_SCALE = "report_scale"  # study attribute: "budget" (per-mille of each trial's steps) or "steps"


# what a trial with the same settings as a finished one takes over from it (its model stays where it is)
REUSED_ATTRS = ("run_dir", "model_dir", "folder",
                "best_step", "test", "train_seconds", "parameters", "nonzero_parameters",
                "latency_ms", "latency_batch_size", "values", "ci95")


def model_cost(run_dir: Path, batch_size: int = 32, batches: int = 8) -> dict[str, Any]:
    """A finished run's model: parameters (non-zero ones too, for magnitude pruning) and the median CPU
    latency of a forward pass over batches of its own validation texts. An adapter is merged first, as it
    would be deployed; everything runs on CPU whatever trained the model, so trials compare."""
    from finetune.data import load_splits
    from finetune.inference import latency_ms, parameter_counts
    from finetune.policies import plain
    from finetune.predict import load_run
    from finetune.tasks import TASKS

    run = load_run(run_dir)
    model = plain(run.model)[0]  # an adapter merged, as it would be deployed
    data, cols = run.recipe.data, run.recipe.data.columns
    rows = reuse(("data", json.dumps(data.model_dump(mode="json"))), lambda: load_splits(data))
    split = rows["validation"]
    task = TASKS[run.recipe.task]
    columns = task.input_columns(cols)  # words, or a text and maybe its pair
    texts = split[columns[0]][:batch_size * batches]
    pairs = split[columns[1]][:batch_size * batches] if len(columns) > 1 else None
    counts = parameter_counts(model)
    latency = latency_ms(model.cpu(), run.tokenizer, texts, batch_size, data.max_length, repeats=batches,
                         warmup=2, pairs=pairs, words=task.words)
    return {"parameters": counts["total"], "nonzero_parameters": counts["nonzero"],
            "latency_ms": round(latency, 2), "latency_batch_size": batch_size}


def _time_split(results: list, seconds: float) -> dict[str, float]:
    """Where a trial's wall time went (summed over repeats): training steps, evaluation, setup
    (data, model, folder), checkpoints, test, and the rest (export, pruning, sweep bookkeeping)."""
    split: dict[str, float] = {}
    for result in results:
        for part, value in result.metrics.get("seconds", {}).items():
            split[part] = round(split.get(part, 0.0) + value, 2)
    split["other"] = round(seconds - sum(split.values()), 2)
    split["outside_training"] = round(1 - split.get("train", 0.0) / max(seconds, 1e-9), 4)
    return split


def _check_values(recipe: RecipeConfig, cfg: SweepConfig) -> None:
    """Each listed value and range end must be valid on its own, so a typo fails now, not as trial 7.
    Only errors about the parameter's own keys count: one that names another key (kind=freeze
    without freeze_layers) may be valid together with other parameters, and is judged per trial."""
    for key, spec in cfg.parameters.items():
        if spec.paired:
            candidates = [[format_override(k, v) for k, v in choice.items()] for choice in spec.choice]
        else:
            values = spec.choice or list(spec.uniform or spec.loguniform or spec.int)
            candidates = [[format_override(spec.sets(key), v)] for v in values]
        for overrides in candidates:
            keys = tuple(o.partition("=")[0] for o in overrides)
            try:
                recipe.with_overrides(overrides)
            except RecipeError as err:
                if any(line.strip().startswith(tuple(f"{k}:" for k in keys)) for line in str(err).split("; ")):
                    raise RecipeError(f"sweep.parameters.{key}: {' '.join(overrides)} is not a valid setting: "
                                      f"{err}") from None


def _ci95(values: list[float]) -> float:
    """Half-width of the 95 % confidence interval of the mean (Student's t)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))
