"""Searches that learn from earlier searches: warm starts (``sweep.warm_start``) and widened sweeps.

Five trials are trained, on a tiny model for two steps each; the other checks open sweeps whose
timeout is already spent: such a sweep creates, warm-starts or widens its study, queues its slots, and
stops before training anything.
"""

from __future__ import annotations

import json
import re
import shutil

import optuna
import pytest
from conftest import tiny_recipe
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from finetune import RecipeError
from finetune.sweep import parse_sweep
from finetune.sweep.study import open_storage
from finetune.sweep.trials import (
    SLOTS,
    WARM_FROM,
    WARM_START,
    WIDENED_TO,
    WIDENINGS,
    current_study,
)

FAST = {"epochs": 1, "max_steps": 2, "eval_every": "epoch", "batch_size": 32}
SMALL = {"max_train_samples": 64, "max_eval_samples": 32, "max_test_samples": 16}
SETTINGS = {"objective": {"metric": "loss"}, "measure_cost": False}  # loss: distinct values, no ties
NO_TRIAL = 1e-9  # a timeout already spent when the first trial would start
EARLIER_SPACE = {"train.lr": [3e-3, 2e-2]}


def study_in(sweep_dir, name: str = "tiny") -> optuna.Study:
    return current_study(open_storage(None, sweep_dir), name)


def waiting(study: optuna.Study) -> list[dict]:
    return [t.system_attrs.get("fixed_params", {}) for t in study.get_trials(states=(TrialState.WAITING,))]


def log_of(sweep_dir) -> str:
    return (sweep_dir / "sweep.log").read_text()


@pytest.fixture(scope="module")
def recipe(tiny_backbone, sentiment_dir, tmp_path_factory):
    return tiny_recipe(tiny_backbone, sentiment_dir, tmp_path_factory.mktemp("run"), train=FAST, data=SMALL)


@pytest.fixture(scope="module")
def earlier(recipe, tmp_path_factory):
    """The earlier sweep: a grid of two learning rates (two trials)."""
    return recipe.sweep(EARLIER_SPACE, method="grid", dir=str(tmp_path_factory.mktemp("earlier") / "s"), **SETTINGS)


@pytest.fixture(scope="module")
def warm(recipe, earlier, tmp_path_factory):
    """A Bayesian sweep warm-started from it (two trials; the model waits for 3 finished trials)."""
    return recipe.sweep({"train.lr": {"loguniform": [2e-3, 3e-2]}}, method="bayes", n_trials=2, startup_trials=3,
                        keep_top_k=1, warm_start=str(earlier.sweep_dir), dir=str(tmp_path_factory.mktemp("warm") / "s"),
                        **SETTINGS)


# --- warm start -------------------------------------------------------------------------------


def test_a_warm_started_sweep_tries_the_earlier_best_first(earlier, warm):
    first, second = sorted(warm.trials, key=lambda row: row["number"])
    assert first["number"] == 0 and first["overrides"] == " ".join(earlier.best_params)
    assert f"warm start from {earlier.sweep_dir}: 2 earlier trials inform the sampler (0 skipped: outside this " \
           f"space), best settings tried first: {' '.join(earlier.best_params)}" in log_of(warm.sweep_dir)
    # only 1 of its own trials had finished, but the 2 lent ones count: the model proposed the second
    assert second["guided"] is True and first["guided"] is False


def test_lent_trials_inform_the_sampler_but_are_not_the_sweeps_own(earlier, warm):
    study = study_in(warm.sweep_dir)
    lent = [t for t in study.get_trials() if WARM_FROM in t.user_attrs]
    own = [t for t in study.get_trials() if WARM_FROM not in t.user_attrs]
    assert sorted(t.value for t in lent) == sorted(row["value"] for row in earlier.trials)
    assert all(t.distributions == {"train.lr": FloatDistribution(2e-3, 3e-2, log=True)} for t in lent)  # this space's
    assert all(t.intermediate_values for t in lent)  # same base recipe: the learning curves come along
    assert len(own) == 2 == study.user_attrs[SLOTS] and study.user_attrs[WARM_START]["lent"] == 2
    # not in the report, the result, best/, keep_top_k or ensembles
    assert [row["number"] for row in json.loads((warm.sweep_dir / "report" / "trials.json").read_text())] == [0, 1]
    assert {row["number"] for row in warm.trials} == {0, 1} and warm.best_trial in (0, 1)
    assert json.loads((warm.sweep_dir / "best" / "sweep_trial.json").read_text())["trial"] == warm.best_trial
    assert sorted(p.name for p in (warm.sweep_dir / "trials").iterdir()) == ["0000", "0001"]
    kept = [n for n in (0, 1) if (warm.sweep_dir / "trials" / f"{n:04d}" / "model.safetensors").is_file()]
    assert kept == [warm.best_trial]  # keep_top_k=1 counts its own trials only
    report = (warm.sweep_dir / "report" / "report.md").read_text()
    assert "2 of its finished trials informed the sampler (not listed here" in report
    from finetune.ensemble.command import sweep_candidates

    assert sweep_candidates(warm.sweep_dir, 3) == [(warm.sweep_dir / "trials" / f"{warm.best_trial:04d}",
                                                    f"trial {warm.best_trial}")]


def test_resuming_a_warm_started_sweep_lends_nothing_again(recipe, earlier, warm):
    again = recipe.sweep({"train.lr": {"loguniform": [2e-3, 3e-2]}}, method="bayes", n_trials=2, startup_trials=3,
                         keep_top_k=1, warm_start=str(earlier.sweep_dir), dir=str(warm.sweep_dir), **SETTINGS)
    assert [row["number"] for row in again.trials] == [0, 1]
    assert len([t for t in study_in(warm.sweep_dir).get_trials() if WARM_FROM in t.user_attrs]) == 2
    log = log_of(warm.sweep_dir)
    assert log.count("earlier trials inform the sampler") == 1 and "sweep.warm_start is not used" not in log


def test_earlier_trials_outside_this_space_are_skipped_and_counted(recipe, earlier, tmp_path):
    # lr 0.02 is not a choice here; head.dropout is new: the earlier trials had the recipe's 0.1
    space = {"train.lr": [3e-3, 1e-2], "head.dropout": [0.0, 0.1]}
    recipe.sweep(space, method="random", n_trials=2, timeout=NO_TRIAL, warm_start=str(earlier.sweep_dir),
                 dir=str(tmp_path / "a"), **SETTINGS)
    study = study_in(tmp_path / "a")
    lent = [t for t in study.get_trials() if WARM_FROM in t.user_attrs]
    assert [t.params for t in lent] == [{"train.lr": 0.003, "head.dropout": 0.1}]
    assert lent[0].distributions["train.lr"] == CategoricalDistribution([0.003, 0.01])
    assert "1 earlier trials inform the sampler (1 skipped: outside this space, e.g. trial 1: train.lr=0.02 lies " \
           "outside train.lr's choice [0.003, 0.01])" in log_of(tmp_path / "a")
    # the best earlier trial inside this space comes first; the new key is sampled
    assert waiting(study)[:2] == [{"train.lr": 0.003}, {}]

    # a setting the earlier sweep searched and this one doesn't must equal this recipe's
    other = recipe.with_overrides(["train.lr=0.01"])
    other.sweep({"head.dropout": [0.0, 0.1]}, method="random", n_trials=1, timeout=NO_TRIAL,
                warm_start=str(earlier.sweep_dir / "study.journal"), dir=str(tmp_path / "b"), **SETTINGS)
    assert not [t for t in study_in(tmp_path / "b").get_trials() if WARM_FROM in t.user_attrs]
    assert re.search(r"0 earlier trials inform the sampler \(2 skipped: outside this space, e.g. trial 0: "
                     r"train.lr=0.003 differs from this recipe's 0.01\), best settings tried first: none",
                     log_of(tmp_path / "b"))


def test_a_warm_started_grid_runs_the_earlier_best_first_and_every_point_once(recipe, earlier, tmp_path):
    recipe.sweep({"train.lr": [1e-2, 2e-2, 3e-3]}, method="grid", timeout=NO_TRIAL,
                 warm_start=str(earlier.sweep_dir), dir=str(tmp_path / "g"), **SETTINGS)
    best_lr = float(earlier.best_params[0].split("=")[1])
    slots = waiting(study_in(tmp_path / "g"))
    assert slots[0] == {"train.lr": best_lr} and sorted(s["train.lr"] for s in slots) == [3e-3, 1e-2, 2e-2]


def test_another_objective_is_refused_before_anything_is_created(recipe, earlier, tmp_path):
    with pytest.raises(RecipeError, match="optimised validation loss, this sweep accuracy: their values can't"):
        recipe.sweep({"train.lr": [3e-3]}, method="grid", warm_start=str(earlier.sweep_dir), dir=str(tmp_path / "m"))
    assert optuna.get_all_study_names(open_storage(None, tmp_path / "m")) == []
    with pytest.raises(RecipeError, match="minimizes its objective, this sweep maximizes it"):
        recipe.sweep({"train.lr": [3e-3]}, method="grid", warm_start=str(earlier.sweep_dir), dir=str(tmp_path / "d"),
                     objective={"metric": "loss", "direction": "maximize"})
    with pytest.raises(RecipeError, match=r"holds no study 'other' \(it holds 'tiny': name one with sweep.warm_start_s"):
        recipe.sweep({"train.lr": [3e-3]}, method="grid", warm_start=str(earlier.sweep_dir / "study.journal"),
                     warm_start_study="other", dir=str(tmp_path / "n"), **SETTINGS)


def test_warm_start_keys_are_validated(tmp_path):
    space = {"parameters": {"train.lr": [1e-3]}}
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("hello\n")
    for source, message in [(tmp_path / "missing", ("does not exist; expected a sweep folder (holding sweep.yaml), "
                                                     "an Optuna journal file")),
                            (tmp_path / "folder", "is a folder without sweep.yaml, not a sweep folder; expected"),
                            (tmp_path / "notes.txt", "is neither a sweep folder nor an Optuna journal file"),
                            (f"sqlite:///{tmp_path}/none.db", "that database file does not exist")]:
        with pytest.raises(RecipeError, match=re.escape(message)) as caught:
            parse_sweep({**space, "warm_start": str(source)})
        assert str(caught.value).startswith("sweep.warm_start: ")
    with pytest.raises(RecipeError, match="warm_start_study is set without warm_start"):
        parse_sweep({**space, "warm_start_study": "x"})
    with pytest.raises(RecipeError, match="warm_start_top"):
        parse_sweep({**space, "warm_start_top": -1})


# --- widening a finished sweep --------------------------------------------------------------------


def test_widening_a_grid_keeps_its_trials_and_runs_only_the_new_points(recipe, earlier, tmp_path):
    sweep_dir = tmp_path / "s"
    shutil.copytree(earlier.sweep_dir, sweep_dir)  # a finished two-trial grid
    result = recipe.sweep({"train.lr": [3e-3, 1e-2, 2e-2]}, method="grid", dir=str(sweep_dir), **SETTINGS)
    rows = {row["number"]: row for row in result.trials}
    assert sorted(rows) == [0, 1, 2] and rows[2]["overrides"] == "train.lr=0.01"
    for row in earlier.trials:  # kept as they were
        assert {k: rows[row["number"]][k] for k in ("value", "seconds", "overrides")} == \
               {k: row[k] for k in ("value", "seconds", "overrides")}
    log = log_of(sweep_dir)
    assert "sweep widened (train.lr: choice [0.003, 0.02] -> choice [0.003, 0.01, 0.02]): its 2 finished trials " \
           "are kept, re-expressed in the new space, in study tiny.widened-1" in log
    assert len(re.findall(r"trial \d COMPLETE", log.split("sweep widened")[1])) == 1  # only the new point trained
    study = study_in(sweep_dir)
    assert study.study_name == result.study_name == "tiny.widened-1"
    assert optuna.load_study(study_name="tiny", storage=open_storage(None, sweep_dir)).user_attrs[WIDENED_TO] == \
           "tiny.widened-1"
    assert all(t.distributions["train.lr"] == CategoricalDistribution([0.003, 0.01, 0.02]) for t in study.trials)
    assert "widened from study tiny" in (sweep_dir / "report" / "report.md").read_text()
    from finetune.sweep.report import report_from_dir

    assert len(report_from_dir(sweep_dir)) == 3

    # a new key: the earlier trials had the recipe's head.dropout (0.1); only a new combination is queued
    recipe.sweep({"train.lr": [3e-3, 1e-2, 2e-2], "head.dropout": [0.1, 0.0]}, method="grid", n_trials=4,
                 timeout=NO_TRIAL, dir=str(sweep_dir), **SETTINGS)
    study = study_in(sweep_dir)
    assert study.study_name == "tiny.widened-2" and len(study.user_attrs[WIDENINGS]) == 2
    assert [t.params["head.dropout"] for t in study.trials if t.state == TrialState.COMPLETE] == [0.1, 0.1, 0.1]
    assert waiting(study) == [{"train.lr": 0.003, "head.dropout": 0.0}]


def test_narrowing_or_another_search_is_refused(recipe, earlier, tmp_path):
    sweep_dir = tmp_path / "s"
    shutil.copytree(earlier.sweep_dir, sweep_dir)
    for space, settings, message in [
        ({"train.lr": [3e-3]}, {}, r"which the new ones don't widen: train.lr: choice \[0.003\] leaves out \[0.02\]"),
        ({"head.dropout": [0.1, 0.2]}, {}, "train.lr was removed"),
        ({"train.lr": [3e-3, 2e-2]}, {"method": "random"}, "was started with a different method"),
        ({"train.lr": [3e-3, 2e-2], "train.warmup_ratio": [0.1, 0.2]}, {},
         r"for trial 0 train.warmup_ratio=0.0 lies outside train.warmup_ratio's choice \[0.1, 0.2\]"),
    ]:
        with pytest.raises(RecipeError, match=message):
            recipe.sweep(space, **{"method": "grid", **settings}, dir=str(sweep_dir), timeout=NO_TRIAL, **SETTINGS)
    assert optuna.get_all_study_names(open_storage(None, sweep_dir)) == ["tiny"]  # untouched
    assert study_in(sweep_dir).user_attrs.get(WIDENED_TO) is None


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_widened_ranges_and_new_keys_keep_the_samplers_joint_model(recipe, warm, tmp_path, sampler):
    sweep_dir = tmp_path / "s"
    shutil.copytree(warm.sweep_dir, sweep_dir)  # bayes, train.lr in [2e-3, 3e-2], two own and two lent trials
    recipe.sweep({"train.lr": {"loguniform": [1e-3, 5e-2]}, "head.dropout": {"uniform": [0.0, 0.2]}}, method="bayes",
                 n_trials=3, timeout=NO_TRIAL, dir=str(sweep_dir), **SETTINGS)
    widened = study_in(sweep_dir)
    space = {"train.lr": FloatDistribution(1e-3, 5e-2, log=True), "head.dropout": FloatDistribution(0.0, 0.2)}
    done = widened.get_trials(states=(TrialState.COMPLETE,))
    assert [t.number for t in done] == [0, 1] and all(t.distributions == space for t in done)
    assert [t.params["head.dropout"] for t in done] == [0.1, 0.1]  # the recipe's value
    # the lent trials ran on the earlier sweep's recipe, whose head.dropout is not known here
    assert "2 trials lent by a warm start no longer fit and were left out" in log_of(sweep_dir)
    assert len(waiting(widened)) == 1  # n_trials 2 -> 3
    # the samplers model both parameters jointly from the earlier trials (an unchanged distribution would
    # drop train.lr from their intersection search space, and a missing head.dropout would drop that)
    model = (optuna.samplers.TPESampler(n_startup_trials=2, multivariate=True, seed=0) if sampler == "tpe"
             else optuna.samplers.GPSampler(n_startup_trials=2, seed=0))
    view = optuna.create_study(direction="minimize", sampler=model)
    view.add_trials(done)
    trial = view.ask()
    assert set(trial.relative_params) == set(space)
    assert all(space[k]._contains(space[k].to_internal_repr(v)) for k, v in trial.relative_params.items())
