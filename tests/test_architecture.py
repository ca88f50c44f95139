"""Architecture exploration: truncated backbones, sweeps over backbones / heads / pooling / LoRA
targets, and the accuracy-vs-cost Pareto report."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_recipe
from safetensors.torch import load_file

from finetune.config import RecipeError
from finetune.predict import load_run
from finetune.sweep.report import pareto_front


@pytest.fixture(scope="module")
def wide_backbone(tmp_path_factory, tiny_backbone):
    """A second backbone of another width and depth, with the same tokenizer files."""
    import shutil

    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("wide-bert")
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=96, max_position_embeddings=128)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tiny_backbone / name).is_file():
            shutil.copy(tiny_backbone / name, folder / name)
    return folder


def test_a_truncated_backbone_keeps_its_first_layers_pretrained(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, policy={"kind": "head_only"}, train={"epochs": 1})
    recipe.backbone.num_layers = 1
    result = recipe.run()
    run = load_run(result.run_dir)
    assert len(run.model.backbone.encoder.layer) == 1
    saved, pretrained = load_file(result.run_dir / "model.safetensors"), load_file(tiny_backbone / "model.safetensors")
    assert not any(".layer.1." in k for k in saved)
    for key, value in pretrained.items():
        if ".layer.0." in key:  # head_only: the kept layer is exactly the pretrained one
            assert torch.equal(saved["backbone." + key], value)
    full = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path / "full", policy={"kind": "head_only"}, train={"epochs": 1})
    assert result.metrics["total_parameters"] < full.run().metrics["total_parameters"]


def test_truncating_beyond_the_backbone_depth_names_the_key(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path)
    recipe.backbone.num_layers = 5
    with pytest.raises(RecipeError, match=r"backbone.num_layers=5: the backbone has only 2 layers"):
        recipe.run()


def test_pareto_front_keeps_only_unbeaten_points():
    points = [(1.0, 0.80), (2.0, 0.85), (3.0, 0.84), (2.0, 0.70), (4.0, 0.90), (1.0, 0.80)]
    assert pareto_front(points, maximize=True) == [0, 1, 4, 5]  # equal points don't beat each other
    assert pareto_front([(1.0, 0.3), (2.0, 0.2), (3.0, 0.25)], maximize=False) == [0, 1]


def test_a_sweep_over_backbones_depths_heads_and_pooling_reports_cost(tiny_backbone, wide_backbone, sentiment_dir,
                                                                      tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 1})
    result = recipe.sweep({
        "backbone.name": [str(tiny_backbone), str(wide_backbone)],
        "backbone.num_layers": [1, 2],
        "head": [{"head.type": "linear", "head.pooling": "cls"},
                 {"head.type": "mlp", "head.hidden_size": 16, "head.pooling": "mean"}],
    }, method="grid", dir=str(tmp_path / "sweep"), keep_top_k=None)
    trials = result.trials
    assert len(trials) == 8 and all(t["state"] == "COMPLETE" for t in trials)
    for trial in trials:
        assert trial["latency_ms"] > 0
        assert 0.99 * trial["parameters"] < trial["nonzero_parameters"] <= trial["parameters"]  # zero biases
        recipe_used = json.loads(json.dumps(load_run(result.sweep_dir / trial["model"]).recipe.to_dict()))
        assert f"backbone.num_layers={recipe_used['backbone']['num_layers']}" in trial["overrides"]
    by_setting = {(t["overrides"].split()[0], t["overrides"].split()[1]): t["parameters"] for t in trials
                  if "linear" in t["overrides"]}
    narrow, wide = str(tiny_backbone), str(wide_backbone)
    assert by_setting[(f"backbone.name={narrow}", "backbone.num_layers=1")] < \
        by_setting[(f"backbone.name={narrow}", "backbone.num_layers=2")] < \
        by_setting[(f"backbone.name={wide}", "backbone.num_layers=2")]
    report = (result.sweep_dir / "report" / "report.md").read_text()
    assert (result.sweep_dir / "report" / "pareto.png").stat().st_size > 10_000
    assert "Pareto front" in report and report.count(" * |") >= 1


def test_lora_target_module_sets_are_a_sweep_dimension(tiny_backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, policy={"kind": "lora"}, train={"epochs": 1})
    sets = [["query", "value"], ["query", "key", "value", "dense"]]
    result = recipe.sweep({"policy.lora.target_modules": sets}, method="grid", dir=str(tmp_path / "sweep"),
                          keep_top_k=None)
    adapted = []
    for trial in result.trials:
        config = json.loads((result.sweep_dir / trial["model"] / "adapter_config.json").read_text())
        adapted.append(sorted(config["target_modules"]))
    assert sorted(adapted) == sorted(sorted(s) for s in sets)
    trainable = [json.loads((result.sweep_dir / t["model"] / "metrics.json").read_text())["trainable_parameters"]
                 for t in result.trials]
    assert len(set(trainable)) == 2  # more adapted modules, more trainable parameters


def test_pruning_is_a_sweep_dimension(tiny_backbone, sentiment_dir, tmp_path):
    """A prune: section in the recipe makes each trial's value the pruned model's; sparsity is searched."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, prune={"method": "magnitude"}, train={"epochs": 1})
    result = recipe.sweep({"prune.sparsity": [0.2, 0.8]}, method="grid", dir=str(tmp_path / "sweep"), keep_top_k=1)
    trials = {t["overrides"]: t for t in result.trials}
    light, heavy = trials["prune.sparsity=0.2"], trials["prune.sparsity=0.8"]
    assert heavy["nonzero_parameters"] < light["nonzero_parameters"] < light["parameters"]
    for trial in (light, heavy):
        assert trial["model"].endswith("pruned")
        trial_dir = result.sweep_dir / "trials" / f"{trial['number']:04d}"
        assert (trial_dir / "metrics.json").is_file()  # the unpruned run's record stays
    best = max((light, heavy), key=lambda t: t["value"])
    other = heavy if best is light else light
    pruned_metrics = json.loads((result.sweep_dir / best["model"] / "metrics.json").read_text())
    assert pruned_metrics["validation"]["accuracy"] == best["value"]
    assert not (result.sweep_dir / other["model"] / "model.safetensors").exists()  # keep_top_k=1
    assert load_run(result.sweep_dir / "best").model is not None
