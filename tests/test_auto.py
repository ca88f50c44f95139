"""``finetune auto`` and what it stands on: the auto preset, sweep.budget (a deadline inside each trial,
counted across runs), one recipe key searched in ranges per condition, and Hyperband's defaults."""

from __future__ import annotations

import json
import math
import time

import optuna
import pytest
from conftest import tiny_recipe

from finetune import RecipeError
from finetune.cli import main
from finetune.ensemble.artefact import Ensemble
from finetune.run import train_run
from finetune.sweep import parse_sweep
from finetune.sweep.budget import (
    RUN_SPAN,
    fitted_schedule,
    shortest_trial,
    spent_seconds,
)
from finetune.sweep.preset import recipe_first, resolve
from finetune.sweep.space import to_overrides
from finetune.sweep.study import HEARTBEAT

AUTO_TRAIN = {"epochs": 3, "eval_every": 2, "batch_size": 32, "lr": 1e-4}


# --- the configuration ---------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [("7200", 7200), ("90m", 5400), ("2h", 7200), ("1.5h", 5400), ("45s", 45)])
def test_budget_reads_durations(text, seconds):
    assert parse_sweep({"parameters": {"train.lr": [1e-3]}, "budget": text}).budget == seconds


@pytest.mark.parametrize("raw, message", [
    ({"preset": "auto"}, "preset auto needs a budget"),
    ({"preset": "auto", "budget": "2 hours"}, "expected seconds or a duration such as 90m or 2h"),
    ({"preset": "auto", "budget": "-5m"}, "expected a positive duration"),
    ({}, "give at least one recipe key to search"),
    ({"parameters": {"lr_a": {"loguniform": [1e-5, 1e-4], "key": "train.lr"},
                     "lr_b": {"loguniform": [1e-4, 1e-3], "key": "train.lr"}}}, "all set train.lr: give each a 'when'"),
    ({"parameters": {"lr": {"loguniform": [1e-5, 1e-4], "key": "train.lrr"}}}, "lr.key='train.lrr' is not a recipe key"),
    ({"parameters": {"train.lr": [1e-3]}, "fill_budget": True}, "fill_budget: it needs a budget"),
    ({"parameters": {"train.lr": [1e-3]}, "method": "grid", "budget": 60, "fill_budget": True},
     "fill_budget: grid search trains each point as written"),
    ({"parameters": {"train.epochs": {"uniform": [1, 3]}}, "budget": 60, "fill_budget": True},
     "fill_budget: the space sets train.epochs"),
])
def test_bad_auto_and_budget_settings_are_refused_clearly(raw, message):
    with pytest.raises(RecipeError, match=message):
        parse_sweep(raw)


def test_auto_preset_searches_policies_with_a_learning_rate_range_each(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path)
    cfg = resolve(recipe, parse_sweep({"preset": "auto", "budget": 60, "parameters": {"train.scheduler": ["cosine"]}}))
    assert cfg.method == "bayes" and cfg.pruner.kind == "hyperband" and cfg.test == "none"
    policies = cfg.parameters["policy"].choice
    assert [p["policy.kind"] for p in policies] == ["full", "lora", "freeze"]
    assert policies[2]["policy.freeze_layers"] == 1  # half of the tiny backbone's 2 layers
    for name, policy in zip(("lr_full", "lr_lora", "lr_freeze"), policies):
        spec = cfg.parameters[name]
        assert spec.key == "train.lr" and spec.when == {"policy": policy}
    assert cfg.parameters["train.scheduler"].choice == ["cosine"]  # the user's parameter replaces the preset's
    assert cfg.fill_budget  # time too short for a whole trial goes to a shortened one ...
    epochs = resolve(recipe, parse_sweep({"preset": "auto", "budget": 60, "parameters": {"train.epochs": [1, 2]}}))
    assert epochs.fill_budget is False  # ... unless the user searches the schedule's length
    assert resolve(recipe, cfg) == cfg  # a resumed sweep (its sweep.yaml holds this) resolves to the same search
    # a trial samples one learning rate, under its own policy's name, and sets train.lr with it
    overrides = to_overrides({"policy": "policy.kind=full", "lr_full": 3e-5}, cfg.parameters)
    assert overrides == ["policy.kind=full", "train.lr=3e-05"]


def test_auto_tries_the_recipe_as_written_first(tiny_backbone, sentiment_dir, tmp_path):
    full = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"lr": 1e-4})
    cfg = resolve(full, parse_sweep({"preset": "auto", "budget": 60}))
    assert recipe_first(full, cfg) == [{"policy": "policy.kind=full", "lr_full": 1e-4,
                                        "train.label_smoothing": 0.0, "train.scheduler": "linear"}]
    # a LoRA recipe's own rank and alpha stand for LoRA in the search, so it can be tried as written
    lora = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"lr": 1e-3, "scheduler": "cosine"},
                       policy={"kind": "lora", "lora": {"rank": 4, "alpha": 8}})
    cfg = resolve(lora, parse_sweep({"preset": "auto", "budget": 60}))
    first = recipe_first(lora, cfg)[0]
    assert to_overrides(first, cfg.parameters) == ["policy.kind=lora", "policy.lora.rank=4", "policy.lora.alpha=8.0",
                                                   "train.lr=0.001", "train.label_smoothing=0.0",
                                                   "train.scheduler=cosine"]
    outside = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"lr": 5e-2})  # beyond lr_full's range
    assert recipe_first(outside, resolve(outside, parse_sweep({"preset": "auto", "budget": 60}))) == []


# --- the deadline inside a run ---------------------------------------------------------


def test_a_deadline_stops_training_and_keeps_the_best_evaluation(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 200, "eval_every": 6})
    began = time.monotonic()
    result = train_run(recipe, deadline=began + 8)
    stopped = result.metrics["stopped_at_deadline"]
    assert 0 < stopped["step"] < stopped["of"] == 200 * 12
    assert result.history[-1]["step"] == stopped["step"]  # the final weights got their validation
    assert time.monotonic() - began < 8 + 10  # training ended by the deadline; the rest is test and export
    assert (result.run_dir / "model.safetensors").is_file() or any(result.run_dir.glob("*.safetensors"))


# --- sweeps -----------------------------------------------------------------------------


def test_hyperband_with_default_resources_prunes_instead_of_failing(tiny_backbone, sentiment_dir, tmp_path):
    """min_resource defaults to the first evaluation's step: Optuna's Hyperband takes only a number there, and
    every trial after the first failed with a TypeError."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 1, "eval_every": 2, "batch_size": 16})
    result = recipe.sweep({"train.lr": [1e-2, 1e-7, 2e-7]}, method="grid", dir=str(tmp_path / "hb"),
                          pruner={"kind": "hyperband", "reduction_factor": 3})
    assert [row["state"] for row in result.trials].count("FAIL") == 0
    assert all(row["intermediate"] for row in result.trials)


def test_budget_ends_the_search_and_a_rerun_counts_what_was_spent(tiny_backbone, sentiment_dir, tmp_path):
    # far more epochs than 12 s can train on any machine, so the first trial always meets the deadline
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 4000, "eval_every": 6})
    began = time.monotonic()
    result = recipe.sweep({"train.lr": {"loguniform": [1e-3, 1e-2]}}, method="random", n_trials=50, budget=12,
                          dir=str(tmp_path / "b"))
    seconds, first_run = [row["seconds"] for row in result.trials], time.monotonic() - began
    assert sum(seconds) <= 12 + 6 and first_run < 12 + 30
    assert any(row.get("stopped_at_deadline") for row in result.trials)  # the last one was cut, not let run
    assert "sweep.budget ran out" in (result.sweep_dir / "report" / "report.md").read_text()
    again = recipe.sweep({"train.lr": {"loguniform": [1e-3, 1e-2]}}, method="random", n_trials=50, budget=12,
                         dir=str(tmp_path / "b"))
    # spent: the first run's wall time, which holds its trials' seconds and the time between them
    assert sum(seconds) - 0.5 <= again.spent_before <= first_run + 0.5
    assert len(again.trials) == len(result.trials)  # nothing left: no new trial


def test_spent_time_merges_overlapping_runs_and_counts_trials_from_before_runs_were_recorded():
    study = optuna.create_study()
    for _ in range(2):  # trials that finished before runs were recorded: their own seconds count
        study.add_trial(optuna.trial.create_trial(value=1.0, user_attrs={"seconds": 40.0}))
    now = time.time() + 100  # the recorded runs began after those trials
    study.set_user_attr(f"{RUN_SPAN}a", [now, now + 30])
    study.set_user_attr(f"{RUN_SPAN}b", [now + 20, now + 50])  # a second worker, overlapping the first
    study.set_user_attr(f"{RUN_SPAN}c", [now + 100, now + 110])  # a later resume
    assert spent_seconds(study) == pytest.approx(50 + 10 + 40 + 40)


def test_spent_time_counts_a_killed_workers_trial_up_to_its_last_heartbeat():
    study = optuna.create_study()
    now = time.time()
    study.set_user_attr(f"{RUN_SPAN}a", [now - 100, now - 60])  # the run, marked when its last trial ended
    trial = study.ask()  # the next trial: its worker was killed after this heartbeat, before marking the span
    study._storage.set_trial_system_attr(trial._trial_id, HEARTBEAT, trial_start(study) + 40)
    assert spent_seconds(study) == pytest.approx(40 + 40, abs=0.01)
    study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)  # as recover_stale does
    assert spent_seconds(study) == pytest.approx(40 + 40, abs=0.01)


def test_a_last_trial_is_fitted_to_the_time_left_by_the_slowest_timings():
    study = optuna.create_study()
    add_trial(study, seconds=70, train=55, evaluate=5, steps=120)  # 10 s fixed, 0.5 s a step
    add_trial(study, seconds=50, train=25, evaluate=5, steps=120)  # 20 s fixed (a feature cache), 0.25 s a step
    # timed by the worst of each, 20 s fixed and 0.5 s a step, planned to end by 85 % of the time left (drift)
    assert fitted_schedule(study, 50.1 / 0.85) == (60, 120)
    assert fitted_schedule(study, 40.1 / 0.85) == (40, 120)  # a third of the schedule: the least worth training
    assert fitted_schedule(study, 39.9 / 0.85) is None
    assert fitted_schedule(study, 80.1 / 0.85) is None  # 120 steps: a whole trial fits, nothing to shorten
    assert fitted_schedule(study, 100.2 / 0.85, repeats=2) == (60, 120)  # each of the two runs gets half
    assert fitted_schedule(optuna.create_study(), 50) is None  # nothing completed to time a trial by
    cut = optuna.create_study()  # a trial the deadline stopped: its schedule, not its steps, is the full one
    add_trial(cut, seconds=40, train=30, evaluate=0, steps=60, stopped_at_deadline={"step": 60, "of": 120})
    assert fitted_schedule(cut, 55.1 / 0.85) == (90, 120)


def test_a_whole_trial_is_one_that_trained_its_whole_schedule():
    study = optuna.create_study()
    add_trial(study, seconds=30, train=25, evaluate=0, steps=40, stopped_at_deadline={"step": 40, "of": 120})
    add_trial(study, seconds=40, train=35, evaluate=0, steps=60, shortened={"steps": 60, "of": 120})
    assert shortest_trial(study, whole=True) is None  # cut and shortened trials do not say how long a whole one takes
    add_trial(study, seconds=90, train=80, evaluate=0, steps=120)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs={"seconds": 20.0}))
    assert shortest_trial(study, whole=True) == 90 and shortest_trial(study) == 20


def add_trial(study: optuna.Study, seconds: float, train: float, evaluate: float, steps: int, **attrs) -> None:
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={
        "seconds": seconds, "train_seconds": train, "time_split": {"evaluate": evaluate}, "optimizer_steps": steps,
        **attrs}))


def test_time_too_short_for_a_whole_trial_goes_to_a_shortened_one(tiny_backbone, sentiment_dir, tmp_path,
                                                                   monkeypatch):
    """The runner's side of sweep.fill_budget (the fitting is timed above): the trial that gets the rest of the
    budget trains the shortened schedule, and the record and the report say so."""
    import finetune.sweep.runner as runner

    real = runner.shortest_trial  # after the first trial, no whole trial fits any more
    monkeypatch.setattr(runner, "shortest_trial", lambda study, whole=False: real(study, whole) if not whole or
                        real(study, whole) is None else math.inf)
    timed_by = []

    def fitted(study, seconds, repeats):
        timed_by.append([t.user_attrs["optimizer_steps"] for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))])
        return (5, 24) if len(timed_by) == 1 else None

    monkeypatch.setattr(runner, "fitted_schedule", fitted)
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 2, "eval_every": 2, "batch_size": 16})
    result = recipe.sweep({"train.lr": {"loguniform": [1e-3, 1e-2]}}, method="random", n_trials=2, budget=600,
                          fill_budget=True, dir=str(tmp_path / "fill"))
    assert timed_by[0] == [24] and len(result.trials) == 2  # the first trial's 2 epochs of 12 steps timed it
    shortened = result.trials[1]
    assert shortened["state"] == "COMPLETE" and shortened["overrides"].endswith("train.max_steps=5")
    assert shortened["shortened"] == {"steps": 5, "of": 24}
    metrics = json.loads((result.sweep_dir / "trials" / "0001" / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 5
    assert "sweep.fill_budget: a schedule of 5 of 24 steps" in (result.sweep_dir / "report" / "report.md").read_text()


def trial_start(study: optuna.Study) -> float:
    return study.get_trials(deepcopy=False)[-1].datetime_start.timestamp()


def test_finetune_auto_searches_ensembles_and_reports(tiny_backbone, sentiment_dir, tmp_path, capsys):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=AUTO_TRAIN, output={})
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    folder = tmp_path / "auto"
    assert main(["auto", "--recipe", str(path), "--budget", "30", "--dir", str(folder), "--quiet"]) == 0
    summary = json.loads((folder / "auto" / "auto.json").read_text())
    assert summary["budget_seconds"] == 30 and set(summary["phases_seconds"]) == {"search", "ensemble"}
    assert summary["trials"]["complete"] >= 2
    single, bag = summary["best_single"], summary["ensemble"]
    low, high = single["test_ci95"]
    assert low <= single["test_metrics"]["accuracy"] <= high
    assert bag["members"] and sum(m["weight"] for m in bag["members"]) == pytest.approx(1.0)
    assert (folder / "best").is_dir() and not (folder / "ensemble.partial").exists()
    assert Ensemble.load(folder / "ensemble").predict(["a great film"])[0]["label"] in ("0", "1")
    report = (folder / "auto" / "report.md").read_text()
    assert "best single: trial" in report and "ensemble (greedy" in report
    assert (folder / "auto" / "best_so_far.png").stat().st_size > 0
    trials = json.loads((folder / "report" / "trials.json").read_text())
    assert trials[0]["overrides"] == "policy.kind=full train.lr=0.0001 train.label_smoothing=0.0 train.scheduler=linear"
    assert sum(row["seconds"] or 0 for row in trials) <= 30 * 0.9 + 6  # the search kept to its share
    assert not any(row["test"] for row in trials)  # test is scored once, in the ensemble step
    # a second run resumes: the search's share is spent, so no trial starts; the ensemble is redone
    assert main(["auto", "--recipe", str(path), "--budget", "30", "--dir", str(folder), "--quiet"]) == 0
    again = json.loads((folder / "auto" / "auto.json").read_text())
    assert len(json.loads((folder / "report" / "trials.json").read_text())) == len(trials)
    assert again["earlier_runs_seconds"] > 0 and again["best_single"]["trial"] == single["trial"]
    # the ensemble scores the best trial first and as many more as the budget allows; the rest are named
    kept = [ensemble["candidates"] + len(ensemble.get("left_out", [])) for ensemble in (bag, again["ensemble"])]
    assert bag["candidates"] >= 1 and again["ensemble"]["candidates"] >= 1 and kept[0] == kept[1] <= 6


def test_finetune_auto_refuses_a_bad_budget_before_training(tiny_backbone, sentiment_dir, tmp_path, capsys):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    assert main(["auto", "--recipe", str(path), "--budget", "soon", "--dir", str(tmp_path / "a")]) == 2
    assert "sweep.budget: " in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
