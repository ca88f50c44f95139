"""finetune compare: one curve per variant, same budget and seeds, thresholds, reuse of finished runs, the CLI."""

from __future__ import annotations

import json
import math

import pytest
from conftest import tiny_recipe

import finetune.compare
from finetune import Recipe, RecipeError
from finetune.cli import main
from finetune.compare import (
    Variant,
    compare,
    mean_curve,
    parse_threshold,
    parse_variants,
    resolve_variant,
    threshold_value,
    time_to_reach,
)

QUICK = {"max_steps": 4, "eval_every": 2, "epochs": 1}


def _history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_one_curve_per_variant_pretrained_vs_scratch(tiny_backbone, sentiment_dir, tmp_path):
    """Each variant gets one plotted series with a point per evaluation; pretrained and scratch share
    everything but the initialisation, and start from different validation losses."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=QUICK)
    result = compare(recipe, "pretrained,scratch", tmp_path / "cmp", metric="loss")
    out = tmp_path / "cmp"
    for name in ["curves_steps.png", "curves_seconds.png", "summary.md", "summary.json",
                 "recipes/pretrained.yaml", "recipes/scratch.yaml"]:
        assert (out / name).is_file(), name
    assert list(result.curves) == ["pretrained", "scratch"]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["variant"] for r in summary["rows"]] == ["pretrained", "scratch"]
    for name, curve in result.curves.items():
        history = _history(out / "runs" / f"{name}-seed42")
        assert curve.steps == [r["step"] for r in history] == [2, 4]
        assert curve.mean == [r["loss"] for r in history]
        assert len(curve.seconds) == len(curve.mean) == len(summary["curves"][name]["mean"])
    assert "| pretrained |" in (out / "summary.md").read_text()
    # same recipe but the one key; the losses differ from the first evaluation on
    runs = {name: Recipe.from_yaml(out / "runs" / f"{name}-seed42" / "recipe.yaml").to_dict() for name in result.curves}
    for run in runs.values():
        run.pop("output")
    assert runs["pretrained"]["backbone"].pop("pretrained") is True
    assert runs["scratch"]["backbone"].pop("pretrained") is False
    assert runs["pretrained"] == runs["scratch"]  # same seed, data, budget, lr
    assert result.curves["pretrained"].mean[0] != pytest.approx(result.curves["scratch"].mean[0], abs=1e-4)


def test_seeds_average_into_a_band_and_policy_presets_set_their_lr(tiny_backbone, sentiment_dir, tmp_path):
    """Two seeds per variant: the curve is their mean with a min-max band; lora and head_only get their
    preset learning rates because they change the recipe's policy (full, lr 5e-3)."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=QUICK)
    result = compare(recipe, "lora,head_only", tmp_path / "cmp", seeds=[1, 2], threshold="0.5", metric="loss")
    rows = {r["variant"]: r for r in result.rows}
    assert rows["lora"]["lr"] == 1e-3 and rows["head_only"]["lr"] == 5e-3
    assert rows["lora"]["trainable_parameters"] > rows["head_only"]["trainable_parameters"]
    for name, curve in result.curves.items():
        histories = [_history(tmp_path / "cmp" / "runs" / f"{name}-seed{seed}") for seed in (1, 2)]
        losses = [[r["loss"] for r in h] for h in histories]
        assert curve.mean == pytest.approx([(a + b) / 2 for a, b in zip(*losses)])
        assert curve.low == [min(pair) for pair in zip(*losses)] and curve.high == [max(pair) for pair in zip(*losses)]
        assert losses[0] != losses[1]  # the seeds really differ
    assert result.threshold == 0.5


def test_time_to_threshold_on_a_hand_built_history():
    """The first evaluation at or past the threshold, in the metric's direction; None when never."""
    steps, seconds = [10, 20, 30, 40], [1.5, 3.0, 4.5, 6.0]
    accuracy = [0.6, 0.8, 0.79, 0.9]
    assert time_to_reach(steps, seconds, accuracy, 0.8, greater=True) == (20, 3.0)
    assert time_to_reach(steps, seconds, accuracy, 0.85, greater=True) == (40, 6.0)
    assert time_to_reach(steps, seconds, accuracy, 0.95, greater=True) is None
    loss = [0.7, math.nan, 0.4, 0.5]
    assert time_to_reach(steps, seconds, loss, 0.4, greater=False) == (30, 4.5)
    assert threshold_value("relative", 0.95, 0.9, greater=True) == pytest.approx(0.855)
    assert threshold_value("relative", 0.95, 0.3, greater=False) == pytest.approx(0.315)
    assert threshold_value("absolute", 0.8, 0.9, greater=True) == 0.8
    assert parse_threshold("95%") == ("relative", 0.95) and parse_threshold("0.8") == ("absolute", 0.8)
    with pytest.raises(RecipeError, match="threshold"):
        parse_threshold("150%")
    # seeds that stopped early are averaged over the steps they share; seconds shift by the feature pass
    a = [{"step": 2, "train_seconds": 1.0, "loss": 1.0}, {"step": 4, "train_seconds": 2.0, "loss": 0.5}]
    b = [{"step": 2, "train_seconds": 3.0, "loss": 0.8}]
    curve = mean_curve([a, b], "loss", offsets=[0.0, 1.0])
    assert curve.steps == [2] and curve.seconds == [2.5] and curve.mean == [pytest.approx(0.9)]


def test_variant_names_and_custom_variants(tiny_backbone, sentiment_dir, tmp_path):
    """Presets by name, NAME:key=value,... for custom ones (lists keep their commas); clear errors."""
    variants = parse_variants("full,r4:policy.kind=lora,policy.lora.rank=4,"
                              "policy.lora.target_modules=[query,value],head_only")
    assert [v.name for v in variants] == ["full", "r4", "head_only"]
    assert variants[1].overrides == ["policy.kind=lora", "policy.lora.rank=4",
                                     "policy.lora.target_modules=[query,value]"]
    for text, message in [("full,bogus", "unknown variant 'bogus'; known: pretrained, scratch"),
                          ("lora,lora", "appears twice"), ("full,train.lr=1", "must follow NAME:key=value"),
                          ("a b:train.lr=1", "not a usable name"), ("", "at least one")]:
        with pytest.raises(RecipeError, match=message):
            parse_variants(text)
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path)  # 2 layers, policy full, lr 5e-3
    frozen, _ = resolve_variant(recipe, Variant("freeze", ["policy.kind=freeze", "policy.freeze_embeddings=true"]))
    assert (frozen.policy.freeze_embeddings, frozen.policy.freeze_layers, frozen.train.lr) == (True, 1, 1e-4)
    assert resolve_variant(recipe, parse_variants("full")[0])[0].train.lr == 5e-3  # already full: its own lr
    assert resolve_variant(recipe, parse_variants("lora")[0], keep_lr=True)[0].train.lr == 5e-3
    back_to_full, _ = resolve_variant(frozen, parse_variants("lora")[0])  # freeze settings are cleared
    assert back_to_full.policy.kind == "lora" and back_to_full.policy.freeze_layers == 0
    with pytest.raises(RecipeError, match="variant bad: unknown recipe key 'train.lrr'"):
        resolve_variant(recipe, parse_variants("bad:train.lrr=1")[0])


def test_rerun_reuses_finished_runs_and_resumes_interrupted_ones(tiny_backbone, sentiment_dir, tmp_path, monkeypatch):
    """A second compare trains nothing; a run missing its final metrics is resumed, not restarted;
    a folder holding a different recipe is refused; --overwrite retrains."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train=QUICK,
                         output={"keep": "model+checkpoint"})  # the checkpoint an interrupted run would have
    first = compare(recipe, "full", tmp_path / "cmp", runs_dir=tmp_path / "weights")
    run_dir = tmp_path / "weights" / "full-seed42"
    assert not (tmp_path / "cmp" / "runs").exists() and (run_dir / "model.safetensors").is_file()
    stamp = (run_dir / "metrics.json").stat().st_mtime_ns

    calls = []
    real = finetune.compare.run_recipe
    monkeypatch.setattr(finetune.compare, "run_recipe", lambda r, **kw: calls.append(kw) or real(r, **kw))
    again = compare(recipe, "full", tmp_path / "cmp", runs_dir=tmp_path / "weights")
    assert calls == [] and (run_dir / "metrics.json").stat().st_mtime_ns == stamp
    assert again.rows == first.rows

    (run_dir / "metrics.json").unlink()  # as if interrupted after the last checkpoint
    resumed = compare(recipe, "full", tmp_path / "cmp", runs_dir=tmp_path / "weights")
    assert calls == [{"resume": True, "overwrite": False}]
    assert resumed.curves["full"].mean == first.curves["full"].mean

    with pytest.raises(RecipeError, match="holds a run of a different recipe"):
        compare(recipe.with_overrides(["train.lr=1e-2"]), "full", tmp_path / "cmp", runs_dir=tmp_path / "weights")
    compare(recipe, "full", tmp_path / "cmp", runs_dir=tmp_path / "weights", overwrite=True)
    assert calls[-1] == {"overwrite": True}


def test_cli_end_to_end_and_its_errors(tiny_backbone, sentiment_dir, tmp_path, capsys):
    """The console command writes curves and table; bad input exits 2 with the known names listed."""
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(tiny_recipe(tiny_backbone, sentiment_dir, tmp_path).to_yaml())
    out = tmp_path / "cli"
    code = main(["compare", "--recipe", str(recipe_file), "--variants", "head_only", "--output", str(out),
                 "--seeds", "3", "train.max_steps=2", "train.eval_every=1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| head_only |" in printed and str(out) in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [3] and len(summary["curves"]["head_only"]["steps"]) == 2
    assert "--variants=head_only" in summary["command"] and "train.eval_every=1" in summary["command"]
    assert (out / "curves_seconds.png").stat().st_size > 0

    assert main(["compare", "--recipe", str(recipe_file), "--variants", "pretrained,frozen"]) == 2
    known = "unknown variant 'frozen'; known: pretrained, scratch, full, lora, head_only, freeze"
    assert known in capsys.readouterr().err
    assert main(["compare", "--recipe", str(recipe_file), "--variants", "full", "--seeds", "1,x"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["compare", "--recipe", str(recipe_file), "--variants", "full", "--metric", "mcc"]) == 2
    assert "--metric" in capsys.readouterr().err
