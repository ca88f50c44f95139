"""Sweeps in one process on a tiny model: the search space, grid/random/bayes, resume, pruning,
failures, repeats, the disk budget, the report and the best model."""

from __future__ import annotations

import itertools
import json

import optuna
import pytest
from conftest import tiny_recipe

from finetune import Recipe, RecipeError
from finetune.predict import load_run, predict
from finetune.sweep import load_sweep_file, parse_sweep
from finetune.sweep.space import grid_points, to_overrides

FAST = {"epochs": 1, "eval_every": 3, "batch_size": 32}


def trials_of(sweep_dir):
    rows = json.loads((sweep_dir / "report" / "trials.json").read_text())
    return {row["number"]: row for row in rows}


def study_of(result):
    from finetune.sweep.study import open_storage

    return optuna.load_study(study_name=result.study_name, storage=open_storage(None, result.sweep_dir))


# --- the sweep section --------------------------------------------------------------


def test_grid_refuses_continuous_ranges_and_names_the_key():
    with pytest.raises(RecipeError, match=r"parameters.train.lr: grid search needs a list of values"):
        parse_sweep({"method": "grid", "parameters": {"train.lr": {"loguniform": [1e-5, 1e-3]}}})


@pytest.mark.parametrize("parameters, message", [
    ({"train.lrr": [1e-3]}, "'train.lrr' is not a recipe key"),
    ({"output.dir": ["a", "b"]}, "'output.dir' is not a recipe key that can be searched"),
    ({"train.lr": {"uniform": [1e-3, 1e-4]}}, "lo > hi"),
    ({"train.lr": {"loguniform": [0, 1e-3]}}, "loguniform needs lo > 0"),
    ({"train.lr": {"choice": [1e-3], "uniform": [0, 1]}}, "exactly one of"),
    ({"policy.lora.rank": {"choice": [4, 8], "when": {"policy.kind": "lora"}}, "policy.kind": ["full", "lora"]},
     "must be a parameter listed before"),
])
def test_bad_search_spaces_fail_with_the_parameter_named(parameters, message):
    with pytest.raises(RecipeError, match=message):
        parse_sweep({"parameters": parameters})


@pytest.mark.parametrize("raw, message", [
    ({"n_trail": 3}, "unknown sweep key 'sweep.n_trail' (did you mean 'sweep.n_trials'?)"),
    ({"pruner": {"kind": "median", "warmup": 3}}, "did you mean 'sweep.pruner.warmup_steps'?"),
    ({"method": "tpe"}, "sweep.method: Input should be 'grid', 'random', 'bayes' or 'gp'"),
])
def test_sweep_key_typos_name_the_sweep_key(raw, message):
    with pytest.raises(RecipeError) as caught:
        parse_sweep({"parameters": {"train.lr": [1e-3]}, **raw})
    assert message in str(caught.value)


def test_grid_enumerates_conditional_and_paired_settings():
    cfg = parse_sweep({"method": "grid", "parameters": {
        "policy.kind": ["full", "lora"],
        "policy.lora.rank": {"choice": [4, 8], "when": {"policy.kind": "lora"}},
        "train.epochs": {"int": [1, 2]},
        "variant": {"choice": [{"head.type": "mlp", "head.hidden_size": 16}, {"head.type": "linear"}]},
    }})
    points = grid_points(cfg.parameters)
    # full: 1 x 2 epochs x 2 variants; lora: 2 ranks x 2 x 2
    assert len(points) == 4 + 8 and cfg.trials_total() == 12
    assert all(("policy.lora.rank" in p) == (p["policy.kind"] == "lora") for p in points)
    overrides = to_overrides(points[0], cfg.parameters)
    assert overrides == ["policy.kind=full", "train.epochs=1", "head.type=mlp", "head.hidden_size=16"]


def test_n_trials_above_the_grid_size_is_refused():
    with pytest.raises(RecipeError, match="exceeds the grid's 2 combinations"):
        parse_sweep({"method": "grid", "n_trials": 3, "parameters": {"train.lr": [1e-3, 1e-2]}})


def test_a_value_invalid_on_its_own_fails_before_any_trial(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path)
    with pytest.raises(RecipeError, match="sweep.parameters.train.lr: train.lr=-0.1 is not a valid setting"):
        recipe.sweep({"train.lr": [1e-3, -0.1]}, method="grid", dir=str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_objective_must_be_a_computed_metric(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path)
    with pytest.raises(RecipeError, match="objective.metric='matthews_correlation' is not computed"):
        recipe.sweep({"train.lr": [1e-3]}, method="grid", objective={"metric": "matthews_correlation"})


def test_the_shipped_sweep_file_loads_with_overrides_for_recipe_and_sweep():
    recipe, cfg = load_sweep_file("recipes/sst2_minilm_sweep.yaml",
                                  ["sweep.method=random", "sweep.n_trials=3", "train.batch_size=16"])
    assert recipe.policy.kind == "lora" and recipe.data.max_train_samples == 8000  # base + merged sections
    assert recipe.train.batch_size == 16 and cfg.method == "random" and cfg.n_trials == 3
    assert set(cfg.parameters) == {"train.lr", "train.epochs", "policy.lora.rank"}
    assert cfg.parameters["policy.lora.rank"].choice == [4, 8, 16, 32]


# --- running sweeps -------------------------------------------------------------------


def test_grid_covers_the_product_exactly_once_across_a_resume(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=FAST)
    space = {"train.lr": [3e-3, 1e-2], "head.dropout": [0.0, 0.2], "train.seed": [1, 2]}
    sweep_dir = tmp_path / "grid"
    first = recipe.sweep(space, method="grid", dir=str(sweep_dir), timeout=0.5)  # stops after its first trial
    assert 1 <= len(first.trials) < 8
    result = recipe.sweep(space, method="grid", dir=str(sweep_dir))
    settings = [tuple(sorted(row["params"].items())) for row in result.trials]
    expected = {tuple(sorted(zip(space, combo))) for combo in itertools.product(*space.values())}
    assert len(settings) == 8 and set(settings) == expected
    assert all(row["state"] == "COMPLETE" for row in result.trials)
    again = recipe.sweep(space, method="grid", dir=str(sweep_dir))  # nothing left: adds nothing
    assert len(again.trials) == 8
    report = (sweep_dir / "report" / "report.md").read_text()
    assert "from 8 finished trials only: indicative" in report  # importances from few trials say so


def test_only_the_kept_models_are_scored_on_test_and_test_is_no_selection_column(tiny_backbone, sentiment_dir,
                                                                                  tmp_path):
    """sweep.test=kept (the default): a trial is scored on test only when keep_top_k keeps its model; the trials
    table and CSV have no test column; an lr-only space measures no cost (one architecture: latency is noise)."""
    from finetune.predict import evaluate_run

    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=FAST)
    # lr 1e-7 learns nothing: it ranks below the two that learn, in the order the trials run
    result = recipe.sweep({"train.lr": [1e-2, 1e-7, 3e-3]}, method="grid", dir=str(tmp_path / "kept"), keep_top_k=1)
    rows = {row["overrides"]: row for row in result.trials}
    first, useless = rows["train.lr=0.01"], rows["train.lr=1e-07"]
    assert first["test"] and not useless["test"]  # kept when it finished / never kept
    best = next(row for row in result.trials if row["number"] == result.best_trial)
    assert best["test"]["accuracy"] == pytest.approx(evaluate_run(result.best_run_dir, "test")["accuracy"])
    metrics = json.loads((result.sweep_dir / best["model"] / "metrics.json").read_text())
    assert metrics["test"] == best["test"]  # written where the model is, and in best/
    assert json.loads((result.best_run_dir / "metrics.json").read_text())["test"] == best["test"]
    report = (result.sweep_dir / "report" / "report.md").read_text()
    table = report[report.index("| trial | state"):].split("\n\n")[0]
    assert "test" not in table
    assert "test" not in (result.sweep_dir / "report" / "trials.csv").read_text().splitlines()[0]
    assert f"| {best['number']} | {best['value']:.4f} | {best['test']['accuracy']:.4f} |" in report  # kept models
    assert all(row["latency_ms"] is None for row in result.trials)
    assert "pareto: not drawn" in report
    everything = recipe.sweep({"train.lr": [1e-2, 1e-7]}, method="grid", dir=str(tmp_path / "all"), keep_top_k=1,
                              test="all", measure_cost=True)
    assert all(row["test"] for row in everything.trials) and all(row["latency_ms"] for row in everything.trials)


def test_random_bayes_and_gp_honour_n_trials_and_the_seed(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=FAST)
    space = {"train.lr": {"loguniform": [1e-3, 3e-2]}, "head.dropout": {"uniform": [0.0, 0.3]},
             "train.epochs": {"int": [1, 2]}}
    for method in ("random", "bayes"):
        runs = [recipe.sweep(space, method=method, n_trials=3, seed=seed, dir=str(tmp_path / f"{method}-{i}"),
                             startup_trials=1)
                for i, seed in enumerate([7, 7, 8])]
        proposals = [[row["overrides"] for row in run.trials] for run in runs]
        assert all(len(p) == 3 for p in proposals)
        assert proposals[0] == proposals[1], f"{method}: the same seed proposed different settings"
        assert proposals[0] != proposals[2]
    assert sum(row["guided"] for row in runs[0].trials) == 2  # bayes: 1 random start, then the model
    gp = [recipe.sweep(space, method="gp", n_trials=3, seed=7, startup_trials=1, dir=str(tmp_path / f"gp-{i}"))
          for i in range(2)]
    assert [row["overrides"] for row in gp[0].trials] == [row["overrides"] for row in gp[1].trials]
    assert sum(row["guided"] for row in gp[0].trials) == 2
    rerun = recipe.sweep(space, method="bayes", n_trials=3, seed=7, dir=str(tmp_path / "bayes-0"))
    assert len(rerun.trials) == 3  # n_trials is the study's size: re-running adds nothing
    grown = recipe.sweep(space, method="bayes", n_trials=4, seed=7, dir=str(tmp_path / "bayes-0"))
    assert len(grown.trials) == 4 and grown.trials[3]["overrides"] not in proposals[0]


def test_conditional_parameters_are_only_set_when_their_condition_holds(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=FAST)
    result = recipe.sweep({"policy.kind": ["full", "lora"],
                           "policy.lora.rank": {"choice": [2, 4], "when": {"policy.kind": "lora"}}},
                          method="grid", dir=str(tmp_path / "cond"))
    assert sorted(row["overrides"] for row in result.trials) == [
        "policy.kind=full", "policy.kind=lora policy.lora.rank=2", "policy.kind=lora policy.lora.rank=4"]
    lora_runs = [row for row in result.trials if "rank=4" in row["overrides"]]
    saved = json.loads((result.sweep_dir / lora_runs[0]["model"] / "adapter_config.json").read_text())
    assert saved["r"] == 4  # the trial really trained with its settings


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=FAST)
    # kind=freeze without freeze_layers is an invalid combination; lr 1e30 diverges to NaN
    result = recipe.sweep({"policy.kind": ["freeze", "full"], "train.lr": [1e30, 3e-3]}, method="grid",
                          dir=str(tmp_path / "fail"))
    by_settings = {row["overrides"]: row for row in result.trials}
    bad_combo = by_settings["policy.kind=freeze train.lr=0.003"]
    assert bad_combo["state"] == "FAIL" and "kind=freeze needs freeze_embeddings" in bad_combo["error"]
    diverged = by_settings["policy.kind=full train.lr=1e+30"]
    assert diverged["state"] == "FAIL" and "TrainingDiverged" in diverged["error"]
    assert by_settings["policy.kind=full train.lr=0.003"]["state"] == "COMPLETE"
    assert result.best_params == ["policy.kind=full", "train.lr=0.003"]
    assert "kind=freeze needs" in (result.sweep_dir / "report" / "report.md").read_text()


def test_pruning_stops_a_bad_trial_early(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 2, "eval_every": 2, "batch_size": 16})
    # the first trial learns; lr 1e-7 cannot, and falls below the median of the first at an early step
    result = recipe.sweep({"train.lr": [1e-2, 1e-7]}, method="grid", dir=str(tmp_path / "prune"),
                          pruner={"kind": "median", "startup_trials": 1, "warmup_steps": 2})
    good, bad = result.trials
    assert good["state"] == "COMPLETE" and len(good["intermediate"]) == 12  # 24 steps, every 2
    assert bad["state"] == "PRUNED" and bad["pruned_at_step"] < 24 and len(bad["intermediate"]) < 12
    assert "pruned at step" in (result.sweep_dir / "report" / "report.md").read_text()
    assert not (result.sweep_dir / "trials" / "0001" / "checkpoints").exists()
    assert (result.sweep_dir / "trials" / "0001" / "MODEL_REMOVED.txt").is_file()  # a pruned trial keeps no model
    assert (result.sweep_dir / "trials" / "0001" / "metrics.jsonl").is_file()


def test_the_median_pruner_compares_trials_at_equal_shares_of_their_own_budgets():
    """Validations are reported at per-mille of each trial's own steps; a trial's best so far meets the median of
    the finished trials' best values up to the same share, wherever their validations fell."""
    from finetune.sweep.study import BudgetMedianPruner

    study = optuna.create_study(direction="maximize", pruner=BudgetMedianPruner(n_startup_trials=1))
    # a finished long schedule: slow start (still warming up at a third of its budget), best at the end
    study.add_trial(optuna.trial.create_trial(value=0.9, intermediate_values={333: 0.6, 667: 0.8, 1000: 0.9}))
    short = study.ask()
    short.report(0.7, 500)  # half its budget: better than the long one was by then (0.6), though below its 0.8
    assert not short.should_prune()
    slow = study.ask()
    slow.report(0.55, 500)
    assert slow.should_prune()
    early = study.ask()
    early.report(0.3, 200)
    assert not early.should_prune()  # the finished trial had no validation that early: nothing to compare


def test_trials_of_different_lengths_report_on_one_budget_scale(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=FAST)
    result = recipe.sweep({"train.epochs": [2, 1]}, method="grid", dir=str(tmp_path / "scale"),
                          pruner={"kind": "median", "startup_trials": 5})
    long, short = result.trials
    assert max(map(int, long["intermediate"])) == max(map(int, short["intermediate"])) == 1000
    assert len(long["intermediate"]) > len(short["intermediate"])  # validations every 3 steps either way


def test_hyperband_pruner_stops_bad_trials(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 2, "eval_every": 2, "batch_size": 16})
    # reduction factor 20 over 2..24 steps gives a single bracket, so every trial meets the good one at step 6
    result = recipe.sweep({"train.lr": [1e-2, 1e-7, 2e-7, 3e-7]}, method="grid", dir=str(tmp_path / "hb"),
                          pruner={"kind": "hyperband", "min_resource": 6, "max_resource": 24, "reduction_factor": 20})
    assert result.trials[0]["state"] == "COMPLETE"
    pruned = [row for row in result.trials if row["state"] == "PRUNED"]
    assert pruned and all(len(row["intermediate"]) < 12 for row in pruned)


def test_repeats_report_mean_and_confidence_interval(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=FAST)
    result = recipe.sweep({"train.lr": [5e-3]}, method="grid", repeats=3, dir=str(tmp_path / "rep"))
    row = result.trials[0]
    assert len(row["values"]) == 3 and row["value"] == pytest.approx(sum(row["values"]) / 3)
    assert row["ci95"] >= 0
    seeds = [Recipe.from_yaml(result.sweep_dir / "trials" / "0000" / f"seed-{i}" / "recipe.yaml").train.seed
             for i in range(3)]
    assert seeds == [42, 43, 44]


def test_disk_budget_best_model_and_report(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=FAST)
    result = recipe.sweep({"train.lr": [1e-7, 3e-3, 1e-2, 2e-7]}, method="grid", keep_top_k=2,
                          dir=str(tmp_path / "budget"))
    ranked = sorted((row for row in result.trials), key=lambda r: -r["value"])
    for rank, row in enumerate(ranked):
        folder = result.sweep_dir / row["model"]
        assert not (folder / "checkpoints").exists()  # only the exported best checkpoint is kept
        has_model = (folder / "model.safetensors").is_file()
        assert has_model == (rank < 2), f"trial {row['number']} (rank {rank})"
        assert (folder / "metrics.json").is_file() and (folder / "train.log").is_file()
    # best/ is the best trial's model and loads like any run folder
    best = result.best_run_dir
    assert json.loads((best / "sweep_trial.json").read_text())["trial"] == result.best_trial == ranked[0]["number"]
    assert result.best_recipe.train.lr == pytest.approx(float(result.best_params[0].split("=")[1]))
    run = load_run(best)
    assert predict(run, ["a great film", "an awful film"])[0]["label"] in ("0", "1")
    report = result.sweep_dir / "report"
    for name in ("trials.csv", "trials.json", "report.md", "history.png", "history.html", "slice.png",
                 "parallel_coordinates.png", "intermediate_values.png"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    assert len((report / "trials.csv").read_text().strip().splitlines()) == 1 + 4
    # the report can be rebuilt from the folder alone
    from finetune.cli import main

    (report / "trials.csv").unlink()
    assert main(["sweep-report", str(result.sweep_dir)]) == 0
    assert (report / "trials.csv").is_file()


def test_a_changed_search_space_does_not_mix_with_an_existing_study(tiny_backbone, sentiment_dir, tmp_path):
    """Widening is allowed (tests/test_sweep_warm.py); a space that doesn't widen the old one, or another
    method, is refused."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=FAST)
    recipe.sweep({"train.lr": [3e-3]}, method="grid", dir=str(tmp_path / "s"))
    with pytest.raises(RecipeError, match="was started with different parameters, which the new ones don't widen"):
        recipe.sweep({"train.lr": [1e-2]}, method="grid", dir=str(tmp_path / "s"))
    with pytest.raises(RecipeError, match="was started with a different method"):
        recipe.sweep({"train.lr": [3e-3]}, method="random", dir=str(tmp_path / "s"))


def test_memory_does_not_grow_across_trials(tiny_backbone, sentiment_dir, tmp_path):
    """12 trials in one process: after the first few (allocator and caches warm up), RSS stays flat.

    A leaked model + AdamW state of this backbone is ~16 MB per trial, so 9 leaked trials would add ~140 MB.
    """
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 1, "eval_every": "epoch",
                                                                         "batch_size": 64})
    result = recipe.sweep({"train.seed": {"int": [0, 11]}}, method="grid", dir=str(tmp_path / "mem"), keep_top_k=1)
    rss = [row["rss_mb"] for row in result.trials]  # measured by the sweep after each trial
    assert len(rss) == 12
    growth = rss[-1] - rss[2]
    assert growth < 60, f"RSS grew {growth:.0f} MB over 9 trials: {rss}"


def test_sweep_command_takes_recipe_and_sweep_overrides(tiny_backbone, sentiment_dir, tmp_path, capsys):
    """`finetune sweep --recipe FILE sweep.method=random sweep.n_trials=2 output.dir=DIR`, as in the README."""
    import yaml

    from finetune.cli import main

    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=FAST)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**recipe.to_dict(), "sweep": {
        "method": "grid", "parameters": {"train.lr": {"loguniform": [1e-3, 1e-2]}}}}))
    sweep_dir = tmp_path / "from-cli"
    assert main(["sweep", "--recipe", str(path), "sweep.method=random", "sweep.n_trials=2",
                 f"output.dir={sweep_dir}"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["sweep_dir"] == str(sweep_dir) and len(final["best_params"]) == 1
    assert len(json.loads((sweep_dir / "report" / "trials.json").read_text())) == 2
    assert main(["sweep", "--recipe", str(path), "sweep.n_trials=2"]) == 2  # grid over a continuous range
    assert "grid search needs a list of values" in capsys.readouterr().err
