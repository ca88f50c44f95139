"""Multi-label classification end to end on a tiny random backbone, and the task registry's loss kept in
step with the model's for every task."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import get_args

import pytest
import torch
from conftest import FILLER, tiny_recipe, write_tsv

from finetune import RecipeError
from finetune.errors import DataError

TOPICS = {"sport": ["football", "tennis", "golf"], "music": ["piano", "guitar", "violin"],
          "food": ["bread", "cheese", "apple"]}


def _rows(seed: int, n: int) -> list[tuple[str, list[str]]]:
    """Each topic word present makes its label apply; about one row in five has none."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        labels = sorted(t for t in TOPICS if rng.random() < 0.4) if i % 5 else []
        words = rng.sample(FILLER, 3) + [rng.choice(TOPICS[t]) for t in labels]
        rng.shuffle(words)
        rows.append((" ".join(words), labels))
    return rows


@pytest.fixture(scope="module")
def topics_jsonl(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("topics-jsonl")
    for seed, (split, n) in enumerate({"train": 160, "validation": 48, "test": 48}.items()):
        with open(folder / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": text, "labels": labels}) + "\n" for text, labels in _rows(seed, n))
    return folder


@pytest.fixture(scope="module")
def topics_tsv(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("topics-tsv")
    for seed, (split, n) in enumerate({"train": 160, "validation": 48, "test": 48}.items()):
        write_tsv(folder / f"{split}.tsv", ["sentence", "topics"], [[t, ";".join(ls)] for t, ls in _rows(seed, n)])
    return folder


def multilabel_recipe(backbone: Path, data_dir: Path, tmp_path: Path, **sections):
    data = {"path": str(data_dir), "columns": {"text": "text", "label": "labels"}, "max_length": 32,
            **sections.pop("data", {})}
    return tiny_recipe(backbone, data_dir, tmp_path, task="multi_label_classification", data=data,
                       train={"epochs": 15, "batch_size": 16, "lr": 5e-3, "eval_every": "epoch", "log_every": 2,
                              **sections.pop("train", {})}, **sections)


@pytest.fixture(scope="module")
def trained(tiny_backbone, topics_jsonl, tmp_path_factory):
    return multilabel_recipe(tiny_backbone, topics_jsonl, tmp_path_factory.mktemp("ml-run")).run()


def test_trains_on_json_label_lists_and_writes_a_multilabel_run(trained):
    """Empty label lists are rows like any other; the run scores with the task's metrics; its config says
    multi-label with one threshold per label."""
    metrics = trained.metrics
    for split in ("validation", "test"):
        assert set(metrics[split]) == {"loss", "multilabel_f1_micro", "multilabel_f1_macro", "exact_match"}
    assert metrics["test"]["multilabel_f1_micro"] > 0.8  # one word decides each label
    config = json.loads((trained.run_dir / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert config["id2label"] == {"0": "food", "1": "music", "2": "sport"} and config["thresholds"] == [0.5] * 3
    report = json.loads((trained.run_dir / "data_report.json").read_text())
    assert report["splits"]["train"]["labels_per_row"]["0"] >= 32  # every fifth row has no label


def test_trains_on_tsv_cells_split_at_the_separator(tiny_backbone, topics_tsv, tmp_path):
    """csv/tsv cells hold labels joined by data.label_separator; an empty cell means none applies."""
    recipe = multilabel_recipe(tiny_backbone, topics_tsv, tmp_path, train={"epochs": 1},
                               data={"columns": {"text": "sentence", "label": "topics"}, "label_separator": ";"})
    result = recipe.run()
    assert json.loads((result.run_dir / "label_map.json").read_text()) == {"0": "food", "1": "music", "2": "sport"}
    assert "multilabel_f1_macro" in result.metrics["test"]


def test_metrics_on_a_hand_example():
    """Two labels over three rows: TP 2, FP 1, FN 1 pooled; per label F1 2/3 and 2/3; one row exactly right."""
    from finetune.metrics import MetricSuite

    suite = MetricSuite(["multilabel_f1_micro", "multilabel_f1_macro", "exact_match"])
    scores = suite.compute(predictions=[[1, 0], [1, 1], [0, 0]], references=[[1, 0], [0, 1], [1, 0]])
    # label 0: TP 1, FP 1, FN 1 -> 0.5; label 1: TP 1 -> 1.0; pooled TP 2, FP 1, FN 1 -> 2/3
    assert scores == pytest.approx({"multilabel_f1_micro": 2 / 3, "multilabel_f1_macro": 0.75, "exact_match": 1 / 3})


def test_threshold_tuning_maximises_each_labels_f1():
    from finetune.tasks.multi_label import tune_thresholds

    probs = torch.tensor([[0.9, 0.2], [0.4, 0.3], [0.35, 0.1], [0.1, 0.05]])
    gold = torch.tensor([[1, 0], [1, 0], [0, 0], [0, 0]])
    # label 0: predicting the two rows above 0.375 gives F1 1; label 1 has no positive row: the default stays
    assert tune_thresholds(probs, gold, 0.5) == pytest.approx([0.375, 0.5])


def test_tuned_thresholds_are_saved_and_used_by_predict_and_eval(trained, tmp_path):
    """tune_thresholds writes config.json's thresholds and the rescored metrics; predict and eval read the
    thresholds from the run folder (extreme ones show it: no label applies, or every one does)."""
    import shutil

    from finetune.predict import evaluate_run, load_run, predict
    from finetune.thresholds import tune_thresholds

    run_dir = tmp_path / "run"
    shutil.copytree(trained.run_dir, run_dir)
    metrics = tune_thresholds(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["thresholds"] == list(metrics["thresholds"].values()) and len(config["thresholds"]) == 3
    assert json.loads((run_dir / "metrics.json").read_text())["untuned"]["test"] == trained.metrics["test"]
    assert "## Thresholds" in (run_dir / "README.md").read_text()
    assert evaluate_run(run_dir, "test")["multilabel_f1_micro"] == pytest.approx(metrics["test"]["multilabel_f1_micro"])

    gold = _test_labels(trained)
    for threshold, expected in ((1.0, []), (0.0, ["food", "music", "sport"])):  # a sigmoid is never above 1
        config["thresholds"] = [threshold] * 3
        (run_dir / "config.json").write_text(json.dumps(config))
        results = predict(load_run(run_dir), ["the golf and the piano", "quite a plot"])
        assert [sorted(r["labels"]) for r in results] == [expected, expected]
        share = sum(labels == expected for labels in gold) / len(gold)
        assert evaluate_run(run_dir, "test")["exact_match"] == pytest.approx(share)


def _test_labels(result) -> list[list[str]]:
    from finetune.recipe import Recipe

    folder = Path(Recipe.from_yaml(result.run_dir / "recipe.yaml").data.path)
    return [json.loads(line)["labels"] for line in (folder / "test.jsonl").read_text().splitlines()]


def test_predict_gives_the_labels_above_threshold_with_their_probabilities(trained, tmp_path, capsys):
    from finetune.cli import main

    inputs = tmp_path / "inputs.txt"
    inputs.write_text("the tennis and the cheese\nit was a plot\n")
    assert main(["predict", "--model", str(trained.run_dir), "--input", str(inputs)]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert sorted(lines[0]["labels"]) == ["food", "sport"] and lines[1]["labels"] == []
    for line in lines:
        assert set(line["probabilities"]) == {"food", "music", "sport"}
        assert all(line["probabilities"][name] > 0.5 for name in line["labels"])
    assert "food 1" in captured.err and "sport 1" in captured.err  # summary: rows holding each label

    out = tmp_path / "predictions.tsv"
    assert main(["predict", "--model", str(trained.run_dir), "--input", str(inputs), "--top-k", "1",
                 "--output", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert list(rows[0]) == ["input", "predicted_labels", "predicted_probabilities"]
    assert sorted(rows[0]["predicted_labels"].split("|")) == ["food", "sport"]  # --top-k leaves the decision whole
    assert len(json.loads(rows[0]["predicted_probabilities"])) == 1


def test_a_run_loads_through_the_text_classification_pipeline_with_sigmoid_scores(trained):
    from transformers import pipeline

    import finetune  # noqa: F401  registers the architecture with the Auto classes
    from finetune.predict import load_run, predict

    classify = pipeline("text-classification", model=str(trained.run_dir), top_k=None)
    scores = {s["label"]: s["score"] for s in classify(["the violin and the bread"])[0]}
    expected = predict(load_run(trained.run_dir), ["the violin and the bread"])[0]["probabilities"]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert sum(scores.values()) > 1.2  # sigmoids (two labels apply), not a softmax


def _write_jsonl(folder: Path, rows: dict[str, list[dict]]) -> Path:
    folder.mkdir()
    for split, records in rows.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


GOOD = [{"text": "a b", "labels": ["x"]}, {"text": "c d", "labels": ["y"]}, {"text": "e", "labels": []}]


@pytest.mark.parametrize("bad, named", [
    ({"text": "f", "labels": "x"}, "validation.jsonl line 4: column 'labels' holds 'x'"),  # not a list
    ({"text": "f", "labels": ["x", None]}, "validation.jsonl line 4: column 'labels' holds ['x', None]"),
    ({"text": "f", "labels": ["z"]}, "has label 'z' not in the label set ['x', 'y'] (data.labels); first at"),
    ({"text": "f", "labels": None}, "validation.jsonl line 4: no label in column 'labels'"),  # missing, not empty
])
def test_bad_labels_are_refused_naming_file_and_line(tmp_path, bad, named):
    from finetune.data import label_names, load_splits

    folder = _write_jsonl(tmp_path / "data", {"train": GOOD, "validation": GOOD + [bad]})
    recipe = multilabel_recipe(tmp_path, folder, tmp_path, data={"labels": ["x", "y"], "splits": {"test": None}})
    with pytest.raises(DataError) as err:
        label_names(recipe, load_splits(recipe.data))
    assert named in str(err.value) and f"{folder / 'validation.jsonl'} line 4" in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_tsv_cells_and_settings_are_refused(tmp_path):
    from finetune.data import label_names, load_splits

    folder = tmp_path / "data"
    folder.mkdir()
    write_tsv(folder / "train.tsv", ["text", "labels"], [["a", "x|y"], ["b", ""], ["c", "x||y"]])
    write_tsv(folder / "validation.tsv", ["text", "labels"], [["a", "x"]])
    recipe = multilabel_recipe(tmp_path, folder, tmp_path, data={"splits": {"test": None}})
    with pytest.raises(DataError, match=r"train.tsv line 4: .* has an empty label name"):
        label_names(recipe, load_splits(recipe.data))
    with pytest.raises(RecipeError, match="data.label_separator=; has no effect with task=classification"):
        tiny_recipe(tmp_path, folder, tmp_path, data={"path": str(folder), "label_separator": ";"})
    with pytest.raises(RecipeError, match="eval.tune_thresholds=true has no effect with task=regression"):
        tiny_recipe(tmp_path, folder, tmp_path, task="regression", eval={"tune_thresholds": True,
                                                                        "metrics": ["pearson"], "primary": "pearson"})
    with pytest.raises(RecipeError, match="'accuracy' cannot score task=multi_label_classification"):
        multilabel_recipe(tmp_path, folder, tmp_path, eval={"metrics": ["accuracy"], "primary": "accuracy"})
    lists = _write_jsonl(tmp_path / "lists", {"train": GOOD[:2], "validation": GOOD[:2]})
    classification = tiny_recipe(tmp_path, lists, tmp_path, data={"path": str(lists), "splits": {"test": None},
                                                                 "columns": {"label": "labels"}})
    with pytest.raises(DataError, match="not one label .*set task: multi_label_classification"):
        label_names(classification, load_splits(classification.data))


def test_registry_matches_the_recipe_schema():
    from finetune.config import Task
    from finetune.metrics import DEFAULTS
    from finetune.tasks import TASKS

    assert set(get_args(Task)) == set(TASKS) == set(DEFAULTS)


@pytest.mark.parametrize("task, data, columns", [
    ("classification", "sentiment_dir", {"text": "sentence"}),
    ("regression", "regression_dir", {"text": "text", "label": "score"}),
    ("token_classification", "ner_dir", {"tags": "ner_tags"}),
    ("multi_label_classification", "topics_jsonl", {"text": "text", "label": "labels"}),
])
def test_the_models_loss_equals_the_tasks_evaluation_loss(request, tiny_backbone, tmp_path, task, data, columns):
    """The loss lives in two places (the model, copied into run folders, and Task.evaluate on gathered
    logits): on the same batch they agree, for every task."""
    from transformers import AutoTokenizer

    from finetune.backbones import build_model
    from finetune.data import label_names, load_splits, make_collator, tokenize
    from finetune.tasks import TASKS

    folder = request.getfixturevalue(data)
    recipe = tiny_recipe(tiny_backbone, folder, tmp_path, task=task,
                         data={"path": str(folder), "columns": columns, "max_length": 32},
                         eval={"metrics": [{"regression": "pearson", "token_classification": "entity_f1",
                                            "multi_label_classification": "exact_match"}.get(task, "accuracy")]})
    raw = load_splits(recipe.data)
    labels = label_names(recipe, raw)
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    rows = tokenize(recipe, raw, tokenizer, labels)["validation"].select(range(12))
    batch = make_collator(recipe, tokenizer)([rows[i] for i in range(len(rows))])
    model = build_model(recipe, tiny_backbone, labels).eval()
    with torch.no_grad():
        out = model(**batch)
    loss, _, _ = TASKS[task].evaluate([out.logits.float()], [batch["labels"]], labels,
                                      TASKS[task].thresholds(model.config, recipe, labels))
    assert loss == pytest.approx(out.loss.item(), rel=1e-5)


@pytest.mark.parametrize("policy", [{"kind": "head_only"}, {"kind": "lora", "lora": {"rank": 4}}])
def test_cached_features_and_adapters_train_and_keep_tuned_thresholds(tiny_backbone, topics_jsonl, tmp_path,
                                                                      monkeypatch, policy):
    """head_only trains on cached pooled vectors (multi-hot labels stored whole); a LoRA run keeps its tuned
    thresholds in base/config.json, which its reloaded model reads."""
    from finetune.predict import load_run
    from finetune.thresholds import tune_thresholds

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    recipe = multilabel_recipe(tiny_backbone, topics_jsonl, tmp_path, policy=policy, train={"max_steps": 6})
    result = recipe.run()
    assert (tmp_path / "cache" / "features").is_dir() == (policy["kind"] == "head_only")
    metrics = tune_thresholds(result.run_dir)
    assert load_run(result.run_dir).model.config.thresholds == list(metrics["thresholds"].values())


def test_a_recipe_that_asks_for_tuned_thresholds_gets_them_when_training_ends(tiny_backbone, topics_jsonl, tmp_path):
    """eval.tune_thresholds: true tunes them as the run's last step (before output.keep removes the checkpoint),
    so the result, metrics.json and the saved model already use them."""
    recipe = multilabel_recipe(tiny_backbone, topics_jsonl, tmp_path, train={"max_steps": 6},
                               eval={"tune_thresholds": True})
    result = recipe.run()
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert "untuned" in saved and result.metrics["thresholds"] == saved["thresholds"]
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["thresholds"] == list(saved["thresholds"].values())
