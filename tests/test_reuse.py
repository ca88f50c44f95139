"""A sweep's trials read the backbone and tokenise the data once, never train the same settings twice,
and report where their time went."""

from __future__ import annotations

import json

import torch
from conftest import tiny_recipe
from safetensors.torch import load_file
from transformers import AutoModel

from finetune import data as data_lib
from finetune.reuse import reuse, sharing


def test_reuse_builds_once_inside_sharing_and_every_time_outside():
    made = []

    def make():
        made.append(1)
        return {"weights": [1.0]}

    first, second = reuse("k", make), reuse("k", make)
    assert len(made) == 2 and first is not second  # nothing kept outside sharing()
    with sharing():
        shared, again, private = reuse("k", make), reuse("k", make), reuse("k", make, private=True)
    assert len(made) == 3
    assert shared is again and private is not shared and private == shared
    private["weights"].append(2.0)
    assert shared["weights"] == [1.0]  # a private copy never changes the stored original


def test_sweep_trials_read_the_backbone_and_tokenise_once(tiny_backbone, sentiment_dir, tmp_path, monkeypatch):
    loads, tokenisations = [], []
    original_load, original_tokenize = AutoModel.from_pretrained, data_lib.tokenize

    def counting_load(*args, **kwargs):
        loads.append(args[0])
        return original_load(*args, **kwargs)

    def counting_tokenize(*args, **kwargs):
        tokenisations.append(1)
        return original_tokenize(*args, **kwargs)

    monkeypatch.setattr(AutoModel, "from_pretrained", counting_load)
    monkeypatch.setattr(data_lib, "tokenize", counting_tokenize)
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 1})
    result = recipe.sweep({"train.lr": [1e-2, 1e-3, 1e-4]}, method="grid", dir=str(tmp_path / "sweep"))
    assert [t["state"] for t in result.trials] == ["COMPLETE"] * 3
    assert len(loads) == 1 and len(tokenisations) == 1

    # each trial trained its own copy: the stored weights were never touched by trial 0's training,
    # so trial 1 started from the file's weights and ended somewhere else than trial 0
    pretrained = load_file(tiny_backbone / "model.safetensors")
    key = next(k for k in pretrained if k.endswith("attention.self.query.weight"))
    trained = [load_file(result.sweep_dir / "trials" / f"{n:04d}" / "model.safetensors") for n in range(3)]
    name = "backbone." + key
    assert not torch.equal(trained[0][name], pretrained[key])
    assert not torch.equal(trained[0][name], trained[1][name])
    # the smallest learning rate moves the weights least: trial 2 began at the pretrained weights
    moved = [float((t[name] - pretrained[key]).abs().max()) for t in trained]
    assert moved[2] < moved[1] < moved[0]


def test_each_trial_reports_where_its_time_went(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 1})
    result = recipe.sweep({"train.lr": [1e-2, 1e-3]}, method="grid", dir=str(tmp_path / "sweep"))
    for trial in result.trials:
        split = trial["time_split"]
        assert set(split) >= {"setup", "train", "evaluate", "checkpoint", "test", "other", "outside_training"}
        assert all(split[part] >= 0 for part in ("setup", "train", "evaluate", "checkpoint", "test"))
        assert abs(sum(split[p] for p in ("setup", "train", "evaluate", "checkpoint", "test", "other"))
                   - trial["seconds"]) < 0.1
        assert abs(split["outside_training"] - (1 - split["train"] / trial["seconds"])) < 0.01
    report = (result.sweep_dir / "report" / "report.md").read_text()
    assert "time outside training steps: median" in report
    metrics = json.loads((result.sweep_dir / "trials" / "0000" / "metrics.json").read_text())
    assert metrics["seconds"]["train"] == metrics["train_seconds"]


def test_settings_proposed_again_reuse_the_finished_trial(tiny_backbone, sentiment_dir, tmp_path):
    """Random search over 2 settings for 5 trials: only 2 train; the others take over a finished
    trial's result and model, and keep_top_k counts models, not trials."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 1})
    result = recipe.sweep({"train.lr": [1e-2, 1e-4]}, method="random", n_trials=5, dir=str(tmp_path / "sweep"),
                          keep_top_k=1)
    trials = result.trials
    assert len(trials) == 5 and all(t["state"] == "COMPLETE" for t in trials)
    trained = [t for t in trials if t["duplicate_of"] is None]
    assert len(trained) == 2 and {t["overrides"] for t in trained} == {"train.lr=0.01", "train.lr=0.0001"}
    by_number = {t["number"]: t for t in trials}
    for trial in trials:
        if trial["duplicate_of"] is not None:
            original = by_number[trial["duplicate_of"]]
            assert trial["overrides"] == original["overrides"] and trial["value"] == original["value"]
            assert trial["model"] == original["model"] and trial["seconds"] == 0.0
            assert not (result.sweep_dir / "trials" / f"{trial['number']:04d}").exists()  # nothing trained
    best, other = sorted(trained, key=lambda t: t["value"], reverse=True)
    assert (result.sweep_dir / best["model"] / "model.safetensors").is_file()
    assert (result.sweep_dir / other["model"] / "MODEL_REMOVED.txt").is_file()
    report = (result.sweep_dir / "report" / "report.md").read_text()
    assert "its result, nothing trained" in report
