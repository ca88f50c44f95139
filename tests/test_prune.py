"""Pruning: magnitude (exact sparsity), attention heads and encoder layers (really smaller models),
the recovery fine-tune, the report, the recipe section, the command, and the real MiniLM."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SHARED_DATA, tiny_recipe

from finetune import RecipeError
from finetune.cli import main
from finetune.config import PruneConfig
from finetune.inference import latency_ms, parameter_counts, weights_size_bytes
from finetune.modeling import attention_projections, encoder_layers, head_count
from finetune.predict import evaluate_run, load_run, predict
from finetune.prune import (
    choose_heads,
    choose_layers,
    head_importance,
    mean_loss,
    prune_heads,
    prune_run,
)
from finetune.publish import export_model

LAYERS, HEADS, HIDDEN = 3, 4, 32
HEAD_PARAMS = 3 * (HIDDEN * HIDDEN // HEADS + HIDDEN // HEADS) + HIDDEN * HIDDEN // HEADS  # q/k/v rows + biases, output columns


@pytest.fixture(scope="module")
def backbone(tiny_backbone, tmp_path_factory):
    """3 layers of 4 heads (head size 8): room to remove heads and layers."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("prunable-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_backbone).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(backbone, sentiment_dir, tmp_path_factory):
    """A finished full fine-tune that solves the sentiment task."""
    recipe = tiny_recipe(backbone, sentiment_dir, tmp_path_factory.mktemp("trained"), train={"epochs": 3})
    result = recipe.run()
    assert result.metrics["validation"]["accuracy"] >= 0.8
    return result.run_dir


def backbone_linear_weights(model) -> list[torch.Tensor]:
    return [m.weight for m in model.backbone.modules() if isinstance(m, torch.nn.Linear)]


def state(run_dir) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_run(run_dir).model.state_dict().items()}


# --- measurements ------------------------------------------------------------------------------


def test_parameter_counts_and_latency_are_real_measurements(trained):
    """Zeroing weights lowers only the non-zero count; latency is a positive time on real inputs."""
    run = load_run(trained)
    before = parameter_counts(run.model)
    assert before["total"] == sum(p.numel() for p in run.model.parameters())
    assert before["total"] - HIDDEN <= before["nonzero"] <= before["total"]  # the padding token's embedding is zero
    with torch.no_grad():
        run.model.classifier.layers[-1].weight.zero_()
    after = parameter_counts(run.model)
    assert after["total"] == before["total"] and after["nonzero"] == before["nonzero"] - HIDDEN * 2
    texts = ["a great film", "the plot was dull and boring", "fine"]
    assert 0 < latency_ms(run.model, run.tokenizer, texts, batch_size=2, max_length=16, repeats=3, warmup=1) < 5000
    assert weights_size_bytes(trained) == (trained / "model.safetensors").stat().st_size


# --- magnitude ------------------------------------------------------------------------------------


def test_magnitude_reaches_the_exact_sparsity_on_the_backbone_linears_only(trained, tmp_path):
    """round(s x N) of the backbone's linear weights are zero; embeddings and head are untouched;
    the dense file keeps its size, the report says so."""
    report = prune_run(trained, PruneConfig(method="magnitude", sparsity=0.37), tmp_path / "pruned",
                       latency_repeats=2)
    pruned = load_run(tmp_path / "pruned").model
    weights = backbone_linear_weights(pruned)
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.37 * total) == report["details"]["zero_weights"]
    original, after = state(trained), pruned.state_dict()
    for name in ("backbone.embeddings.word_embeddings.weight", "classifier.layers.1.weight",
                 "classifier.layers.1.bias", "backbone.encoder.layer.0.attention.self.query.bias"):
        assert torch.equal(original[name], after[name]), name
    # the smallest weights went: every surviving weight is at least as large as every pruned one
    flat_before = torch.cat([original[n].flatten() for n, m in pruned.backbone.named_modules()
                             for n in [f"backbone.{n}.weight"] if isinstance(m, torch.nn.Linear)])
    flat_after = torch.cat([w.flatten() for w in weights])
    assert flat_before[flat_after == 0].abs().max() <= flat_before[flat_after != 0].abs().min()
    assert report["after"]["nonzero_parameters"] == report["before"]["nonzero_parameters"] - zeros
    assert report["after"]["parameters"] == report["before"]["parameters"]
    assert report["after"]["size_mb"] == pytest.approx(report["before"]["size_mb"], abs=0.01)
    assert report["after"]["compressed_mb"] < report["before"]["compressed_mb"]


def test_recovery_fine_tune_trains_but_keeps_the_sparsity_exact(trained, tmp_path):
    """After a recovery epoch the surviving weights have moved, and exactly as many are zero as asked."""
    report = prune_run(trained, PruneConfig(method="magnitude", sparsity=0.5, finetune_epochs=1, finetune_lr=1e-3),
                       tmp_path / "pruned", latency_repeats=2)
    pruned = load_run(tmp_path / "pruned").model
    weights = backbone_linear_weights(pruned)
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.5 * total)
    assert report["recovery"]["steps"] == 12  # 192 rows / 16 per batch
    original = state(trained)["backbone.encoder.layer.0.intermediate.dense.weight"]
    recovered = pruned.backbone.encoder.layer[0].intermediate.dense.weight
    kept = recovered != 0
    assert not torch.allclose(original[kept], recovered[kept])  # it trained
    assert report["after"]["validation"]["accuracy"] >= 0.8
    # it is the run's own lifecycle (finetune.run.train_run): evaluated, best step kept, its folder gone after
    assert report["recovery"]["best_step"] == 12 and "accuracy" in report["recovery"]["validation"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


# --- heads ------------------------------------------------------------------------------------------


def test_heads_are_removed_for_real_and_the_saved_model_reloads(trained, tmp_path):
    """Half the heads go: exactly their parameters disappear, every layer keeps one, the config
    records them, and the reloaded folder reproduces the in-memory model's validation loss."""
    report = prune_run(trained, PruneConfig(method="heads", heads_fraction=0.5), tmp_path / "pruned",
                       latency_repeats=2)
    removed = LAYERS * HEADS // 2
    assert report["details"]["heads_before"] == LAYERS * HEADS
    assert report["details"]["heads_after"] == LAYERS * HEADS - removed
    assert report["before"]["parameters"] - report["after"]["parameters"] == removed * HEAD_PARAMS
    run = load_run(tmp_path / "pruned")
    counts = [head_count(layer) for layer in encoder_layers(run.model.backbone)]
    assert sum(counts) == LAYERS * HEADS - removed and min(counts) >= 1
    recorded = run.model.config.removed_heads
    assert sum(map(len, recorded.values())) == removed
    assert parameter_counts(run.model)["total"] == report["after"]["parameters"]
    assert report["after"]["size_mb"] < report["before"]["size_mb"]
    again = evaluate_run(tmp_path / "pruned", "validation")
    assert again["loss"] == pytest.approx(report["after"]["validation"]["loss"], abs=1e-6)
    assert predict(run, ["a lovely film"])[0]["label"] in {"0", "1"}


def test_reloaded_head_pruned_model_gives_the_same_logits(trained, tmp_path):
    """Slicing in memory, saving, and loading again (the heads re-removed at build time) agree to the bit."""
    run = load_run(trained)
    prune_heads(run.model, {0: [1, 3], 2: [0]})
    prune_heads(run.model, {0: [0]})  # a second round: numbers are the layer's current ones
    assert run.model.config.removed_heads == {"0": [0, 1, 3], "2": [0]}  # current head 0 was original head 0
    (tmp_path / "out").mkdir()
    export_model(run.model, run.tokenizer, run.labels, tmp_path / "out", merge_lora=False)
    reloaded = type(run.model).from_pretrained(tmp_path / "out").eval()
    assert [head_count(layer) for layer in encoder_layers(reloaded.backbone)] == [1, HEADS, HEADS - 1]
    enc = run.tokenizer(["the movie was great", "a dull and boring plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(run.model.eval()(**enc).logits, reloaded(**enc).logits)


def test_head_importance_finds_a_silenced_head(trained):
    """A head whose value projection is zero contributes nothing: importance 0, and it goes first."""
    run = load_run(trained)
    attention, (_, _, value), _, _ = attention_projections(encoder_layers(run.model.backbone)[1])
    size = attention.attention_head_size
    with torch.no_grad():
        getattr(attention, value).weight[2 * size:3 * size] = 0
        getattr(attention, value).bias[2 * size:3 * size] = 0
    enc = run.tokenizer(["a great film", "an awful plot", "fine story", "boring actor"], padding=True,
                        return_tensors="pt")
    batches = [{**enc, "labels": torch.tensor([1, 0, 1, 0])}]
    scores = head_importance(run.model, batches)
    assert [len(s) for s in scores] == [HEADS] * LAYERS
    assert float(scores[1][2]) == 0 and all(float(s.min()) >= 0 for s in scores)
    assert choose_heads(scores, 1) == {1: [2]}


def test_choose_heads_never_empties_a_layer():
    """Even when one layer holds all the least important heads, its last one stays."""
    scores = [torch.tensor([0.01, 0.02, 0.03]), torch.tensor([0.5, 0.6, 0.7])]
    assert choose_heads(scores, 4) == {0: [0, 1], 1: [0, 1]}


# --- layers -----------------------------------------------------------------------------------------


def test_layer_dropping_keeps_k_layers_that_load_and_run(trained, tmp_path):
    """layers_kept=1 of 3 ("first"): one layer left, config says so, plain loading works, it predicts."""
    report = prune_run(trained, PruneConfig(method="layers", layers_kept=1, layer_selection="first"), tmp_path / "p",
                       latency_repeats=2)
    run = load_run(tmp_path / "p")
    assert len(encoder_layers(run.model.backbone)) == 1
    assert run.model.config.backbone_config.num_hidden_layers == 1
    assert report["details"]["layers_kept"] == [0]
    full = load_run(trained).model
    per_layer = sum(p.numel() for p in encoder_layers(full.backbone)[0].parameters())
    assert report["before"]["parameters"] - report["after"]["parameters"] == 2 * per_layer
    assert len(predict(run, ["a lovely film", "an awful film"])) == 2


def test_importance_keeps_the_layers_whose_removal_hurts_most(trained, tmp_path):
    """Each greedy step drops the layer with the lowest loss without it, so keeping n-1 layers by
    importance is never worse on those batches than keeping the first n-1."""
    run = load_run(trained)
    enc = run.tokenizer(["a great film", "an awful plot", "fine story", "the boring actor", "superb", "poor"],
                        padding=True, return_tensors="pt")
    batches = [{**enc, "labels": torch.tensor([1, 0, 1, 0, 1, 0])}]
    kept, steps = choose_layers(run.model, LAYERS - 1, "importance", batches)
    assert len(kept) == LAYERS - 1 and kept == sorted(kept) and set(kept) <= set(range(LAYERS))
    losses = {int(k): v for k, v in steps[0]["loss_without"].items()}
    assert steps[0]["dropped"] == min(losses, key=losses.get) and steps[0]["dropped"] not in kept
    assert losses[steps[0]["dropped"]] <= losses[LAYERS - 1] + 1e-9  # vs dropping the last ("first" keeps 0..n-2)
    assert len(encoder_layers(run.model.backbone)) == LAYERS  # the trial removals were undone
    assert mean_loss(run.model, batches) == pytest.approx(mean_loss(load_run(trained).model, batches))
    assert choose_layers(run.model, 2, "first", batches) == ([0, 1], [])


def test_importance_layers_through_prune_run_are_valid_and_recorded(trained, tmp_path):
    report = prune_run(trained, PruneConfig(method="layers", layers_kept=2, importance_samples=32), tmp_path / "p",
                       latency_repeats=2)
    kept = report["details"]["layers_kept"]
    assert len(kept) == 2 and set(kept) < set(range(LAYERS))
    assert len(report["details"]["importance_steps"]) == 1
    assert len(encoder_layers(load_run(tmp_path / "p").model.backbone)) == 2


# --- other tasks and LoRA ---------------------------------------------------------------------------


def test_lora_run_is_merged_then_pruned_into_a_plain_run(backbone, sentiment_dir, tmp_path):
    recipe = tiny_recipe(backbone, sentiment_dir, tmp_path, policy={"kind": "lora", "lora": {"rank": 4}},
                         train={"max_steps": 6, "lr": 1e-2})
    run_dir = recipe.run().run_dir
    report = prune_run(run_dir, PruneConfig(method="heads", heads_fraction=0.25), tmp_path / "pruned",
                       latency_repeats=2)
    assert report["lora_merged"] is True
    assert not (tmp_path / "pruned" / "adapter_config.json").exists()
    assert report["after"]["parameters"] == report["before"]["parameters"] - 3 * HEAD_PARAMS
    assert evaluate_run(tmp_path / "pruned", "validation")["loss"] == pytest.approx(
        report["after"]["validation"]["loss"], abs=1e-6)


@pytest.mark.parametrize("task", ["regression", "token_classification"])
def test_structured_pruning_works_for_other_tasks(task, backbone, regression_dir, ner_dir, tmp_path):
    sections = ({"task": "regression", "data": {"path": str(regression_dir), "columns": {"text": "text", "label": "score"}},
                 "eval": {"metrics": ["pearson"], "primary": "pearson"}} if task == "regression" else
                {"task": "token_classification",
                 "data": {"path": str(ner_dir), "columns": {"tokens": "tokens", "tags": "ner_tags"}},
                 "eval": {"metrics": ["entity_f1"], "primary": "entity_f1"}})
    recipe = tiny_recipe(backbone, regression_dir, tmp_path, train={"max_steps": 4}, **sections)
    run_dir = recipe.run().run_dir
    report = prune_run(run_dir, PruneConfig(method="heads", heads_fraction=0.25, finetune_epochs=0.5), tmp_path / "p",
                       latency_repeats=2)
    assert report["details"]["heads_after"] == LAYERS * HEADS - 3
    assert math.isfinite(report["after"]["validation"]["loss"])
    assert evaluate_run(tmp_path / "p", "test")["loss"] == pytest.approx(report["after"]["test"]["loss"], abs=1e-5)


# --- the recipe section and the command ---------------------------------------------------------------


def test_recipe_prune_section_makes_the_pruned_folder_the_result(backbone, sentiment_dir, tmp_path):
    """Recipe.run() prunes the best model into RUN_DIR/pruned; its metrics are the result's, the
    original ones are kept under "unpruned"."""
    recipe = tiny_recipe(backbone, sentiment_dir, tmp_path, train={"epochs": 2},
                         prune={"method": "layers", "layers_kept": 2, "layer_selection": "first"})
    result = recipe.run()
    assert result.run_dir == tmp_path / "run" / "pruned"
    assert set(result.metrics) >= {"validation", "test", "unpruned", "prune"}
    assert "best_step" in result.metrics["unpruned"]
    assert result.metrics["prune"]["details"]["layers_kept"] == [0, 1]
    again = evaluate_run(result.run_dir, "validation")
    assert again["loss"] == pytest.approx(result.metrics["validation"]["loss"], abs=1e-6)
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert saved["validation"]["accuracy"] == result.metrics["validation"]["accuracy"]
    assert (result.run_dir / "prune_report.md").read_text().count("|") > 20


def test_several_processes_are_refused(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="single process"):
        prune_run(trained, PruneConfig(method="magnitude"), tmp_path / "p", latency_repeats=2)


def test_prune_command_end_to_end(trained, tmp_path, capsys):
    """`finetune prune` writes a run folder that `finetune predict` uses, and prints the table."""
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(trained), "--method", "heads", "--heads-fraction", "0.25",
                 "--output", str(out), "data.max_test_samples=20"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| parameters |" in printed and json.loads(printed.strip().splitlines()[-1])["pruned_run"] == str(out)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["config"]["method"] == "heads" and report["config"]["heads_fraction"] == 0.25
    inputs = tmp_path / "in.txt"
    inputs.write_text("a superb film\nan awful film\n")
    assert main(["predict", "--model", str(out), "--input", str(inputs)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert main(["prune", "--model", str(trained), "--method", "heads", "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--method", "magnitude", "--sparsity", "1.5"], "--sparsity: Input should be less than 1"),
    (["--method", "layers"], "--method: method=layers needs layers_kept"),
    (["--method", "layers", "--layers-kept", "3"], "keep between 1 and 2"),
    (["--method", "heads", "--heads-fraction", "0.9"], "keeps at least one"),
])
def test_prune_command_rejects_bad_settings_before_any_work(args, message, trained, tmp_path, capsys):
    assert main(["prune", "--model", str(trained), "--output", str(tmp_path / "p"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_prune_command_rejects_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["prune", "--model", str(tmp_path), "--method", "magnitude"]) == 2
    assert "not a finished run folder" in capsys.readouterr().err


# --- the real backbone ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_minilm_heads_and_layers_shrink_and_reload(tmp_path):
    """all-MiniLM-L6-v2 on 200 SST-2 rows: removing half of its 72 heads and 3 of its 6 layers gives
    smaller models that reload with the same validation loss."""
    import recipes

    assert (SHARED_DATA / "sst2" / "train.tsv").is_file(), "SST-2 is expected in ../shared/data"
    recipe = recipes.sst2_minilm_full("data.max_train_samples=200", "data.max_eval_samples=64",
                                      "data.max_test_samples=64", "train.epochs=1", "train.eval_every=epoch",
                                      f"output.dir={tmp_path / 'run'}")
    run_dir = recipe.run().run_dir
    heads = prune_run(run_dir, PruneConfig(method="heads", heads_fraction=0.5, importance_samples=32), tmp_path / "h",
                      latency_repeats=5)
    assert (heads["details"]["heads_before"], heads["details"]["heads_after"]) == (72, 36)
    assert heads["before"]["parameters"] - heads["after"]["parameters"] == 36 * (3 * (384 * 32 + 32) + 384 * 32)
    layers = prune_run(run_dir, PruneConfig(method="layers", layers_kept=3, importance_samples=32), tmp_path / "l",
                       latency_repeats=5)
    assert len(layers["details"]["layers_kept"]) == 3
    assert layers["after"]["latency_ms_batch32"] < layers["before"]["latency_ms_batch32"]
    for folder, report in ((tmp_path / "h", heads), (tmp_path / "l", layers)):
        again = evaluate_run(folder, "validation")
        assert again["loss"] == pytest.approx(report["after"]["validation"]["loss"], abs=1e-5)
