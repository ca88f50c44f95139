"""End-to-end training on tiny random backbones: learning, outputs, model selection, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe, write_tsv
from safetensors.torch import load_file

from finetune import RecipeError
from finetune.errors import TrainingDiverged
from finetune.predict import evaluate_run


def test_learns_a_learnable_task_and_writes_the_run_folder(tiny_backbone, sentiment_dir, tmp_path):
    """A one-word sentiment rule is learnt; every promised output file is there and consistent."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 4},
                         eval={"metrics": ["accuracy", "f1_macro"], "primary": "accuracy"})
    result = recipe.run()
    assert result.metrics["validation"]["accuracy"] >= 0.9
    assert result.metrics["test"]["accuracy"] >= 0.85
    run = result.run_dir
    for name in ["recipe.yaml", "metrics.jsonl", "metrics.json", "label_map.json", "README.md", "train.log",
                 "config.json", "model.safetensors", "modeling_finetune.py", "tokenizer.json"]:
        assert (run / name).is_file(), name
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [12, 24, 36, 48]  # 192 rows / 16 per batch, once per epoch
    assert json.loads((run / "metrics.json").read_text())["best_step"] == result.best_step
    assert json.loads((run / "label_map.json").read_text()) == {"0": "0", "1": "1"}
    assert "trainable" in (run / "train.log").read_text()
    card = (run / "README.md").read_text()
    assert str(tiny_backbone) in card and "accuracy" in card


def test_token_counts_are_exact_and_grouping_cuts_padding(tiny_backbone, sentiment_dir, tmp_path):
    """Real tokens = the training split's tokenised lengths x epochs; length grouping processes fewer padded ones."""
    from transformers import AutoTokenizer

    from finetune.data import read_table

    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    sentences = list(read_table(sentiment_dir / "train.tsv")["sentence"])
    real = sum(len(ids) for ids in tokenizer(sentences, truncation=True, max_length=32)["input_ids"])
    metrics = {}
    for grouped in (True, False):
        recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path / str(grouped), train={"epochs": 2, "group_by_length": grouped})
        metrics[grouped] = recipe.run().metrics
        assert metrics[grouped]["tokens_real"] == 2 * real
        assert metrics[grouped]["tokens_processed"] >= metrics[grouped]["tokens_real"]
    assert metrics[True]["tokens_processed"] < metrics[False]["tokens_processed"]
    assert 0 <= metrics[True]["padding_fraction"] < metrics[False]["padding_fraction"]


def test_final_model_is_the_best_evaluation_not_the_last(tiny_backbone, sentiment_dir, tmp_path):
    """The exported model reproduces the best evaluation's validation loss, even when later ones were worse."""
    # lower loss is better here, and a high constant lr makes late evaluations noisy
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path,
                         train={"epochs": 6, "lr": 5e-3, "scheduler": "constant", "eval_every": 4},
                         eval={"metrics": ["accuracy"], "primary": "loss"})
    result = recipe.run()
    losses = {r["step"]: r["loss"] for r in result.history}
    assert result.best_step == min(losses, key=losses.get)
    again = evaluate_run(result.run_dir, "validation")
    assert again["loss"] == pytest.approx(losses[result.best_step], abs=1e-5)


def test_early_stopping_stops_after_patience(tiny_backbone, sentiment_dir, tmp_path):
    """With patience 1 and a metric that saturates, training ends long before max_steps."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path,
                         train={"max_steps": 400, "eval_every": 6, "early_stopping_patience": 1, "lr": 5e-3})
    result = recipe.run()
    assert result.metrics["optimizer_steps"] < 400
    values = [r["accuracy"] for r in result.history]
    assert values[-1] <= max(values[:-1])  # the last evaluation did not improve


def test_text_pairs_with_string_labels(tiny_backbone, pairs_dir, tmp_path):
    """Pairs go in as two segments; string labels keep their inferred order in the label map."""
    recipe = tiny_recipe(tiny_backbone, pairs_dir, tmp_path, train={"epochs": 3},
                         data={"path": str(pairs_dir), "columns": {"text": "s1", "text_pair": "s2", "label": "relation"},
                               "max_length": 48},
                         eval={"metrics": ["accuracy", "f1_macro", "mcc"], "primary": "f1_macro"})
    result = recipe.run()
    assert json.loads((result.run_dir / "label_map.json").read_text()) == {"0": "neutral", "1": "opposite", "2": "same"}
    assert set(result.metrics["test"]) == {"loss", "accuracy", "f1_macro", "mcc"}


def test_regression(tiny_backbone, regression_dir, tmp_path):
    """Regression trains with MSE and reports Pearson/Spearman; the loss goes down."""
    recipe = tiny_recipe(tiny_backbone, regression_dir, tmp_path, task="regression",
                         data={"path": str(regression_dir), "columns": {"text": "text", "label": "score"}},
                         train={"epochs": 4, "eval_every": 6},
                         eval={"metrics": ["pearson", "spearman"], "primary": "pearson"})
    result = recipe.run()
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.metrics["test"]["pearson"] > 0.3


def test_token_classification(tiny_backbone, ner_dir, tmp_path):
    """Entity tagging with sub-word alignment reaches a useful entity F1 on held-out sentences."""
    recipe = tiny_recipe(tiny_backbone, ner_dir, tmp_path, task="token_classification",
                         data={"path": str(ner_dir), "columns": {"tokens": "tokens", "tags": "ner_tags"}},
                         train={"epochs": 8, "lr": 5e-3},
                         eval={"metrics": ["entity_f1", "entity_precision"], "primary": "entity_f1"})
    result = recipe.run()
    assert result.metrics["test"]["entity_f1"] > 0.5


def test_existing_run_is_refused_without_overwrite(tiny_backbone, sentiment_dir, tmp_path):
    """A second run into the same folder fails before touching it; --overwrite replaces it."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"max_steps": 2})
    first = recipe.run()
    before = (first.run_dir / "model.safetensors").read_bytes()
    with pytest.raises(RecipeError, match="already holds a run"):
        recipe.run()
    assert (first.run_dir / "model.safetensors").read_bytes() == before
    recipe.run(overwrite=True)
    with pytest.raises(RecipeError, match="no checkpoints/last"):
        tiny_recipe(tiny_backbone, sentiment_dir, tmp_path / "other", train={"max_steps": 2}).run(resume=True)


def test_bad_data_fails_before_the_run_folder_exists(tiny_backbone, tmp_path):
    """A label outside data.labels is named in the error, and no run folder is created."""
    data = tmp_path / "data"
    data.mkdir()
    write_tsv(data / "train.tsv", ["sentence", "label"], [["good film", "pos"], ["bad film", "neg"]])
    write_tsv(data / "validation.tsv", ["sentence", "label"], [["fine film", "pos"], ["dull", "meh"]])
    write_tsv(data / "test.tsv", ["sentence", "label"], [["nice", "pos"]])
    recipe = tiny_recipe(tiny_backbone, data, tmp_path, data={"path": str(data), "labels": ["neg", "pos"]})
    with pytest.raises(RecipeError, match="'meh' not in the label set"):
        recipe.run()
    assert not (tmp_path / "run").exists()


def test_max_length_above_model_limit_is_refused(tiny_backbone, sentiment_dir, tmp_path):
    """max_length beyond what the backbone can embed is an error naming the field."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, data={"path": str(sentiment_dir), "max_length": 4096})
    with pytest.raises(RecipeError, match="data.max_length=4096"):
        recipe.run()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_backbone, tmp_path):
    """A target of 1e30 (finite, so the data checks pass) overflows the squared error to inf: the run stops
    naming the step; the checkpoint before it survives."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [[f"the film number {i}", str(i % 3)] for i in range(64)]
    rows[40][1] = "1e30"
    write_tsv(data / "train.tsv", ["text", "score"], rows)
    write_tsv(data / "validation.tsv", ["text", "score"], rows[:8])
    recipe = tiny_recipe(tiny_backbone, data, tmp_path, task="regression",
                         data={"path": str(data), "columns": {"text": "text", "label": "score"},
                               "splits": {"test": None}},
                         train={"epochs": 1, "batch_size": 4, "checkpoint_every": 1, "group_by_length": False},
                         eval={"metrics": ["pearson"], "primary": "pearson"})
    with pytest.raises(TrainingDiverged, match=r"at step \d+") as info:
        recipe.run()
    step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert step > 1
    state = json.loads((tmp_path / "run" / "checkpoints" / "last" / "train_state.json").read_text())
    assert state["global_step"] == step - 1
    assert not (tmp_path / "run" / "model.safetensors").exists()  # no model exported from a diverged run


def test_tensorboard_tracker_writes_under_the_run_folder(tiny_backbone, sentiment_dir, tmp_path):
    """report_to: [tensorboard] logs training loss and validation metrics as event files in the run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"max_steps": 6, "eval_every": 3},
                         output={"dir": str(tmp_path / "run"), "report_to": ["tensorboard"]})
    result = recipe.run()
    events = list(result.run_dir.rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/loss", "validation/accuracy"} <= tags


def test_unknown_tracker_is_refused(tiny_backbone, sentiment_dir, tmp_path):
    """A tracker name Accelerate doesn't know is an error naming output.report_to."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, output={"dir": str(tmp_path / "run"), "report_to": ["nosuch"]})
    with pytest.raises(RecipeError, match="output.report_to"):
        recipe.run()
    assert not (tmp_path / "run").exists()


def test_bf16_autocast_on_cpu_trains(tiny_backbone, sentiment_dir, tmp_path):
    """mixed_precision=bf16 runs on CPU (autocast) and still learns the one-word rule."""
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"epochs": 4, "mixed_precision": "bf16"})
    result = recipe.run()
    assert result.metrics["validation"]["accuracy"] >= 0.85


def test_binary_metric_on_three_labels_is_refused_before_writing(tiny_backbone, pairs_dir, tmp_path):
    """f1 (positive class) on a 3-class task fails before the run folder exists, pointing to f1_macro."""
    recipe = tiny_recipe(tiny_backbone, pairs_dir, tmp_path,
                         data={"path": str(pairs_dir), "columns": {"text": "s1", "text_pair": "s2", "label": "relation"}},
                         eval={"metrics": ["f1"], "primary": "f1"})
    with pytest.raises(RecipeError, match="_macro"):
        recipe.run()
    assert not (tmp_path / "run").exists()


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tiny_backbone, sentiment_dir, tmp_path):
    """output.dir pointing at a non-empty folder of other files is refused, even with overwrite."""
    precious = tmp_path / "project"
    (precious / "checkpoints").mkdir(parents=True)
    (precious / "notes.txt").write_text("keep me")
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, output={"dir": str(precious)}, train={"max_steps": 2})
    with pytest.raises(RecipeError, match="holds no finetune run"):
        recipe.run(overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_run_in_the_default_folder_can_be_resumed_by_naming_it(tiny_backbone, sentiment_dir, tmp_path, monkeypatch):
    """Without output.dir the run goes to runs/<name>-<time>; the saved recipe records it, so resume works."""
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, output={"dir": None, "keep": "model+checkpoint"},
                         train={"max_steps": 3})
    result = recipe.run()
    assert result.run_dir.parent == Path("runs") and result.run_dir.name.startswith("tiny-")
    again = recipe.with_overrides([f"output.dir={result.run_dir}"]).run(resume=True)
    assert again.best_step == result.best_step


@pytest.fixture(scope="module")
def tiny_backbone_without_dropout(tmp_path_factory, tiny_backbone):
    """The tiny backbone with dropout off, so eager and compiled training can be compared step for step
    (inductor draws dropout masks from its own generator)."""
    import shutil

    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    for item in tiny_backbone.iterdir():
        shutil.copy(item, folder / item.name)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
def test_torch_compile_trains_to_the_same_weights_as_eager(tiny_backbone_without_dropout, sentiment_dir, tmp_path):
    """train.compile=true: same losses, metrics and saved parameter names as eager, within float tolerance."""
    results = {}
    for compiled in (False, True):
        recipe = tiny_recipe(tiny_backbone_without_dropout, sentiment_dir, tmp_path / str(compiled),
                             head={"pooling": "mean", "dropout": 0.0}, train={"epochs": 1, "compile": compiled})
        results[compiled] = recipe.run()
    eager, compiled = results[False], results[True]
    assert compiled.metrics["validation"]["loss"] == pytest.approx(eager.metrics["validation"]["loss"], abs=1e-4)
    assert compiled.metrics["test"]["accuracy"] == eager.metrics["test"]["accuracy"]
    eager_weights = load_file(eager.run_dir / "model.safetensors")
    compiled_weights = load_file(compiled.run_dir / "model.safetensors")
    assert eager_weights.keys() == compiled_weights.keys()  # no _orig_mod. prefixes in the exported files
    for name, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], value, atol=1e-4, rtol=1e-3)


def test_head_lr_gives_the_head_its_own_learning_rate(tiny_backbone, sentiment_dir, tmp_path):
    """train.head_lr: the classifier's parameters (and only they) get it; the schedule scales both alike."""
    from transformers import get_scheduler

    from finetune.backbones import build_model
    from finetune.loop import make_optimizer

    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"lr": 1e-4}).with_overrides(
        ["train.head_lr=1e-2"])  # a dotted key like any other, so a sweep can search it
    model = build_model(recipe, tiny_backbone, ["negative", "positive"])
    optimizer = make_optimizer(model, recipe)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        heads = {names[id(p)].startswith("classifier.") for p in group["params"]}
        assert heads == ({group["lr"] == 1e-2} if group["params"] else set())
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    lrs = {round(g["lr"] / 1e-4, 6) for g in optimizer.param_groups}
    assert lrs == {0.7, 70.0}
    plain = make_optimizer(model, tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"lr": 1e-4}))
    assert [g["lr"] for g in plain.param_groups] == [1e-4, 1e-4]  # without it: the two groups of before


def test_layer_lr_decay_gives_each_depth_its_own_learning_rate(tiny_backbone, sentiment_dir, tmp_path):
    """train.layer_lr_decay=0.5 on a 2-layer encoder: head at lr, layer 1 at lr/2, layer 0 at lr/4, embeddings
    at lr/8; the run trains with it; a model without numbered layers is refused."""
    from finetune.loop import layer_depths_check, make_optimizer
    from finetune.run import Run

    recipe = tiny_recipe(tiny_backbone, sentiment_dir, tmp_path, train={"lr": 1e-3, "layer_lr_decay": 0.5,
                                                                        "max_steps": 4, "eval_every": 4})
    run = Run(recipe)
    optimizer = make_optimizer(run.model, recipe)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    by_name = {name: lr_of[id(p)] for name, p in run.model.named_parameters() if p.requires_grad}
    assert len(by_name) == sum(len(g["params"]) for g in optimizer.param_groups)  # every trainable parameter, once
    expected = {"classifier.": 1e-3, ".layer.1.": 5e-4, ".layer.0.": 2.5e-4, "embeddings.": 1.25e-4}
    for part, lr in expected.items():
        rates = [rate for name, rate in by_name.items() if part in name]
        assert rates and rates == pytest.approx([lr] * len(rates)), (part, rates)
    run.close()
    assert recipe.run().metrics["optimizer_steps"] == 4
    with pytest.raises(RecipeError, match="train.layer_lr_decay: no numbered encoder layers"):
        layer_depths_check(torch.nn.Sequential(torch.nn.Linear(2, 2)), recipe)
    raw = recipe.to_dict()
    raw["policy"]["kind"] = "head_only"
    with pytest.raises(RecipeError, match=r"train\.layer_lr_decay=0\.5 has no effect with policy\.kind=head_only"):
        type(recipe).from_dict(raw)
