"""The frozen-feature cache for head-only training, and frozen parts running in eval mode."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_recipe
from safetensors.torch import load_file

from finetune import features
from finetune.loop import train_mode
from finetune.run import Run


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("FINETUNE_CACHE", str(folder))
    return folder / "features"


def head_only(backbone, data, tmp_path, name, **train):
    return tiny_recipe(backbone, data, tmp_path / name, policy={"kind": "head_only"},
                       train={"epochs": 3, "lr": 5e-2, "eval_every": 6, **train})


def assert_same_run(plain, cached, tolerance: float) -> dict:
    """Same best step, metrics and exported weights (the whole model, backbone included); returns the weights."""
    assert cached.best_step == plain.best_step
    for split in ("validation", "test"):
        for metric, value in plain.metrics[split].items():
            assert cached.metrics[split][metric] == pytest.approx(value, abs=tolerance), (split, metric)
    trained = [load_file(str(r.run_dir / "model.safetensors")) for r in (plain, cached)]
    assert trained[0].keys() == trained[1].keys()
    for name, tensor in trained[0].items():
        assert torch.allclose(tensor, trained[1][name], atol=tolerance), name
    return trained[1]


def test_cached_features_give_the_uncached_metrics_and_weights(tiny_backbone, sentiment_dir, tmp_path, cache):
    plain = head_only(tiny_backbone, sentiment_dir, tmp_path, "plain", cache_features=False).run()
    cached = head_only(tiny_backbone, sentiment_dir, tmp_path, "cached").run()
    assert len(list(cache.glob("*/*.safetensors"))) == 3  # train, validation, test
    assert "cached backbone features" in (cached.run_dir / "train.log").read_text()
    assert_same_run(plain, cached, tolerance=1e-5)
    assert cached.metrics["validation"]["accuracy"] > 0.6  # and it learns


def test_the_cache_is_reused_and_keyed_by_what_the_features_depend_on(tiny_backbone, sentiment_dir, tmp_path, cache):
    head_only(tiny_backbone, sentiment_dir, tmp_path, "first").run()
    first = {p: p.stat().st_mtime_ns for p in cache.glob("*/*.safetensors")}
    # other head settings, lr, epochs, seed: the same features
    head_only(tiny_backbone, sentiment_dir, tmp_path, "second", lr=1e-2, epochs=1, seed=3).run()
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/*.safetensors")} == first
    # another max_length or pooling: other features
    tiny_recipe(tiny_backbone, sentiment_dir, tmp_path / "short", policy={"kind": "head_only"},
                data={"path": str(sentiment_dir), "columns": {"text": "sentence"}, "max_length": 8},
                train={"epochs": 1}).run()
    tiny_recipe(tiny_backbone, sentiment_dir, tmp_path / "cls", policy={"kind": "head_only"},
                head={"pooling": "cls"}, train={"epochs": 1}).run()
    assert len({p.parent for p in cache.glob("*/*.safetensors")}) == 3


def test_the_cache_only_applies_to_head_only_on_a_pretrained_backbone(tiny_backbone, sentiment_dir, tmp_path, cache):
    assert features.applies(head_only(tiny_backbone, sentiment_dir, tmp_path, "a"))
    assert not features.applies(tiny_recipe(tiny_backbone, sentiment_dir, tmp_path))  # full
    assert not features.applies(head_only(tiny_backbone, sentiment_dir, tmp_path, "b", cache_features=False))
    scratch = head_only(tiny_backbone, sentiment_dir, tmp_path, "c").with_overrides(["backbone.pretrained=false"])
    assert not features.applies(scratch)


@pytest.mark.parametrize("policy, frozen_in_eval, training_in_train", [
    ({"kind": "head_only"}, ["backbone"], ["classifier"]),
    ({"kind": "freeze", "freeze_embeddings": True, "freeze_layers": 1},
     ["backbone.embeddings", "backbone.encoder.layer.0"], ["backbone.encoder.layer.1", "classifier"]),
    ({"kind": "full"}, [], ["backbone", "classifier"]),
])
def test_frozen_parts_run_without_dropout(policy, frozen_in_eval, training_in_train, tiny_backbone, sentiment_dir,
                                          tmp_path, cache):
    run = Run(tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, policy=policy, train={"cache_features": False}))
    model = run.model
    train_mode(model, run.recipe)
    modules = dict(model.named_modules())
    for name in frozen_in_eval:
        assert not any(m.training for m in modules[name].modules()), name
    for name in training_in_train:
        assert modules[name].training, name


def test_lora_keeps_the_usual_dropout_everywhere(tiny_backbone, sentiment_dir, tmp_path, cache):
    run = Run(tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, policy={"kind": "lora"}))
    train_mode(run.model, run.recipe)
    dropouts = [m for m in run.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.training for m in dropouts)


def frozen_lower(backbone, data, tmp_path, name, **train):
    return tiny_recipe(backbone, data, tmp_path / name,
                       policy={"kind": "freeze", "freeze_embeddings": True, "freeze_layers": 1},
                       train={"epochs": 2, "lr": 5e-3, "eval_every": 6, **train})


def test_cached_lower_layers_give_the_uncached_metrics_and_weights(tiny_backbone, sentiment_dir, tmp_path, cache):
    """freeze (embeddings + first layer): the upper layer and head train on the cached hidden states after
    layer 1 and end where training through the frozen layers ends."""
    plain = frozen_lower(tiny_backbone, sentiment_dir, tmp_path, "plain", cache_features=False).run()
    cached = frozen_lower(tiny_backbone, sentiment_dir, tmp_path, "cached").run()
    assert len(list(cache.glob("*/*.safetensors"))) == 3
    assert "layers above the 1 frozen ones on cached backbone features" in (cached.run_dir / "train.log").read_text()
    trained = assert_same_run(plain, cached, tolerance=1e-4)
    upper = "backbone.encoder.layer.1.output.dense.weight"
    initial = load_file(str(tiny_backbone / "model.safetensors"))["encoder.layer.1.output.dense.weight"]
    assert not torch.allclose(trained[upper], initial)  # the upper layer did train
    # a second run (another lr) reads the stored states instead of computing them
    again = frozen_lower(tiny_backbone, sentiment_dir, tmp_path, "again", lr=1e-3).run()
    assert again.metrics["feature_cache_seconds"] < cached.metrics["feature_cache_seconds"]
    assert len(list(cache.glob("*/*.safetensors"))) == 3


def test_cached_lower_layers_for_token_classification(tiny_backbone, ner_dir, tmp_path, cache):
    def ner(name, **train):
        return tiny_recipe(tiny_backbone, ner_dir, tmp_path / name, task="token_classification",
                           data={"path": str(ner_dir), "columns": {"tokens": "tokens", "tags": "ner_tags"},
                                 "max_length": 32},
                           policy={"kind": "freeze", "freeze_embeddings": True, "freeze_layers": 1},
                           train={"epochs": 2, "lr": 5e-3, **train})
    plain, cached = ner("plain", cache_features=False).run(), ner("cached").run()
    assert len(list(cache.glob("*/*.safetensors"))) == 3
    for metric, value in plain.metrics["test"].items():
        assert cached.metrics["test"][metric] == pytest.approx(value, abs=1e-4), metric


def test_the_cache_key_follows_the_frozen_depth(tiny_backbone, sentiment_dir, tmp_path, cache):
    frozen_lower(tiny_backbone, sentiment_dir, tmp_path, "one", epochs=1).run()
    two = frozen_lower(tiny_backbone, sentiment_dir, tmp_path, "two", epochs=1).with_overrides(
        ["policy.freeze_layers=2"])
    assert features.applies(two)
    two.run()
    assert len({p.parent for p in cache.glob("*/*.safetensors")}) == 2
    unfrozen_embeddings = frozen_lower(tiny_backbone, sentiment_dir, tmp_path, "e").with_overrides(
        ["policy.freeze_embeddings=false"])
    assert not features.applies(unfrozen_embeddings)  # trained embeddings change the lower layers' output
