"""``finetune analyze``: the classification numbers against scikit-learn on hand-made outputs, ECE, McNemar
and temperature scaling on known cases, the confusion matrix's order and size, then tiny trained runs
through the command: a run, an ensemble, --compare, --fit-temperature followed by predict."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from conftest import tiny_recipe, write_tsv

from finetune import RecipeError
from finetune.analysis import SplitOutputs, analyze_outputs, calibration, collect
from finetune.analysis.classification import (
    _middle,
    cluster_order,
    confusion_matrix,
    groups_by_value,
    headline,
    per_class,
    plot_confusion,
)
from finetune.analysis.compare import compare, mcnemar_exact
from finetune.analysis.text import input_text
from finetune.cli import main


def outputs_of(gold, probabilities, labels=None, **fields) -> SplitOutputs:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = labels or [f"c{i}" for i in range(probabilities.shape[1])]
    texts = fields.pop("texts", [f"text {i} " + "word " * (i % 7) for i in range(len(gold))])
    return SplitOutputs("classification", "test", fields.pop("model", "runs/a"), texts, fields.pop("pairs", None),
                        labels, np.asarray(gold), probabilities.argmax(1), probabilities, **fields)


def random_outputs(classes: int, rows: int, seed: int = 0, **fields) -> SplitOutputs:
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, classes, rows)
    logits = rng.normal(0, 1.5, (rows, classes))
    logits[np.arange(rows), gold] += 2.5
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return outputs_of(gold, probabilities, **fields)


# --- pure functions -----------------------------------------------------------------------


def test_per_class_numbers_match_scikit_learn():
    """Including a class never predicted and one absent from the gold labels."""
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        precision_recall_fscore_support,
    )

    rng = np.random.default_rng(1)
    gold = rng.choice([0, 1, 2, 3], 200)  # class 4 never true
    predicted = np.where(rng.random(200) < 0.7, gold, rng.choice([0, 1, 2, 4], 200))  # 3 only when right
    predicted[gold == 3] = 0  # class 3 never predicted
    confusion = confusion_matrix(gold, predicted, 5)
    ours, overall = per_class(confusion), headline(confusion)
    precision, recall, f1, support = precision_recall_fscore_support(gold, predicted, labels=range(5), zero_division=0)
    assert ours["precision"] == pytest.approx(precision)
    assert ours["recall"] == pytest.approx(recall)
    assert ours["f1"] == pytest.approx(f1)
    assert ours["support"].tolist() == support.tolist()
    assert overall["accuracy"] == pytest.approx(accuracy_score(gold, predicted))
    assert overall["f1_macro"] == pytest.approx(f1_score(gold, predicted, average="macro", zero_division=0))
    assert overall["f1_weighted"] == pytest.approx(f1_score(gold, predicted, average="weighted", zero_division=0))


def test_expected_calibration_error_on_a_known_case():
    """Half the rows at confidence 0.9 with 80 % right, half at 0.55 with 50 % right: ECE = .5*.1 + .5*.05."""
    confidence = np.array([0.9] * 10 + [0.55] * 10)
    correct = np.array([1] * 8 + [0] * 2 + [1] * 5 + [0] * 5, dtype=bool)
    assert calibration.expected_calibration_error(confidence, correct) == pytest.approx(0.075)
    bins = calibration.reliability_bins(confidence, correct)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 20
    assert [b for b in bins if b["count"]][1]["accuracy"] == pytest.approx(0.8)
    perfect = np.array([1.0] * 5)
    assert calibration.expected_calibration_error(perfect, perfect.astype(bool)) == 0


def test_mcnemar_exact_on_known_cases():
    from scipy.stats import binomtest

    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)  # 2 * P(X <= 1), X ~ Bin(10, 1/2)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(3, 17) == pytest.approx(binomtest(3, 20, 0.5).pvalue)


def test_temperature_scaling_recovers_an_overconfident_models_temperature():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, (4000, 4))
    calibrated = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    gold = np.array([rng.choice(4, p=p) for p in calibrated])  # labels drawn from the calibrated model
    overconfident = calibration.scale(calibrated, 1 / 2.5)  # logits * 2.5
    temperature = calibration.fit_temperature(overconfident, gold)
    assert temperature == pytest.approx(2.5, rel=0.1)
    rescaled = calibration.scale(overconfident, temperature)
    assert (rescaled.argmax(1) == overconfident.argmax(1)).all()
    before, after = calibration.summary(overconfident, gold), calibration.summary(rescaled, gold)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]
    assert calibration.scale(rescaled, 1 / temperature) == pytest.approx(overconfident, abs=1e-9)


def test_clustering_puts_a_confused_pair_side_by_side():
    confusion = np.diag([50] * 8)
    confusion[1, 6], confusion[6, 1] = 20, 5  # 1 and 6 are mistaken for each other
    confusion[2, 4] = 12
    order = cluster_order(confusion)
    assert sorted(order) == list(range(8))
    assert abs(order.index(1) - order.index(6)) == 1
    assert abs(order.index(2) - order.index(4)) == 1
    assert cluster_order(np.diag([5, 5, 5])) == [0, 1, 2]  # nothing confused: the label order stays


def test_77_class_confusion_matrix_is_drawn_legibly(tmp_path):
    import matplotlib.image

    labels = [f"{name}_{i}" for i, name in enumerate(["card_payment_fee_charged", "transfer_not_received_by_recipient",
                                                      "top_up_failed"] * 26)][:77]
    outputs = random_outputs(77, 1500, labels=labels)
    confusion = confusion_matrix(outputs.gold, outputs.predicted, 77)
    path = plot_confusion(confusion, labels, cluster_order(confusion), tmp_path / "confusion.png", "77 classes")
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width >= 77 * 25 and height >= 77 * 25  # at least 25 pixels per cell: 6.5 pt labels fit a row
    shown = [_middle(label, 24) for label in labels]
    assert max(map(len, shown)) <= 24 and len(set(shown)) == 77  # cut in the middle: the endings still differ
    assert _middle("transfer_not_received_by_recipient_1", 24) == "transfer_not_…ecipient_1"


def test_groups_by_length_and_by_value():
    names, index = groups_by_value(list(range(1, 101)))
    assert names == ["1–25", "26–50", "51–75", "76–100"] and np.bincount(index).tolist() == [25] * 4
    names, index = groups_by_value(["web", "news", None, "web"])
    assert names == ["(missing)", "news", "web"] and index.tolist() == [2, 1, 0, 2]
    names, index = groups_by_value([f"v{i % 30}" for i in range(300)] + ["v0"])
    assert len(names) == 20 and names[-1] == "other (11 values)" and "v0" in names


def test_pairs_are_shown_side_by_side_and_long_texts_are_cut():
    outputs = outputs_of([0], [[0.9, 0.1]], texts=["first " * 50], pairs=["second text"])
    shown = input_text(outputs, 0, 80)
    assert " ‖ second text" in shown and "…" in shown and len(shown) <= 80


def test_report_is_written_and_bad_slices_and_folders_are_refused(tmp_path):
    outputs = random_outputs(3, 120, columns={"source": ["web", "news", "forum"] * 40})
    analysis = analyze_outputs(outputs, tmp_path / "analysis", k=4, slices=["source"])
    report = (tmp_path / "analysis" / "report.md").read_text()
    assert report.startswith("# Analysis of a: test split, 120 rows")
    assert "![confusion matrix](confusion.png)" in report and "### By `source`" in report
    saved = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert saved["rows"] == 120 and len(saved["per_class"]) == 3 and len(saved["confident_errors"]) == 4
    assert {r["group"] for r in saved["slices"]["source"]} == {"web", "news", "forum"}
    assert analysis.console[-1].startswith(f"report: {tmp_path / 'analysis' / 'report.md'}")
    assert len(analysis.console) <= 8
    with pytest.raises(RecipeError, match=r"--slice domain: .* its other columns are \['source'\]"):
        analyze_outputs(outputs, tmp_path / "analysis", slices=["domain"])
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match="holds no analysis"):
        analyze_outputs(outputs, tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "mine"
    # an earlier analysis is replaced, but not a file someone added to it
    (tmp_path / "analysis" / "my_notes.md").write_text("mine too")
    with pytest.raises(RecipeError, match=r"holds files finetune analyze did not write \(my_notes.md\)"):
        analyze_outputs(outputs, tmp_path / "analysis")
    assert (tmp_path / "analysis" / "my_notes.md").read_text() == "mine too"


def test_compare_counts_and_refuses_other_labels():
    a = random_outputs(3, 300, seed=3)
    b = random_outputs(3, 300, seed=3, model="runs/b")
    b.predicted = np.where(np.arange(300) % 5 == 0, (a.predicted + 1) % 3, a.predicted)
    section = compare(a, b, k=5).summary
    right_a, right_b = a.predicted == a.gold, b.predicted == a.gold
    assert section["only_a_right"] == int((right_a & ~right_b).sum())
    assert section["only_b_right"] == int((~right_a & right_b).sum())
    assert sum(section[key] for key in ("both_right", "only_a_right", "only_b_right", "both_wrong")) == 300
    assert section["disagreements"] == 60 and len(section["examples"]) == 5
    assert section["mcnemar_exact_p"] == pytest.approx(mcnemar_exact(section["only_a_right"], section["only_b_right"]))
    other = random_outputs(3, 300, seed=3, labels=["x", "y", "z"])
    with pytest.raises(RecipeError, match="different labels"):
        compare(a, other)


# --- trained runs through the command ------------------------------------------------------------


@pytest.fixture(scope="module")
def sourced_dir(sentiment_dir, tmp_path_factory):
    """The sentiment data with a ``source`` column to slice by."""
    folder = tmp_path_factory.mktemp("sourced")
    for split in ("train", "validation", "test"):
        with open(sentiment_dir / f"{split}.tsv") as f:
            rows = list(csv.reader(f, delimiter="\t"))[1:]
        write_tsv(folder / f"{split}.tsv", ["sentence", "label", "source"],
                  [[*row, ["web", "news"][i % 2]] for i, row in enumerate(rows)])
    return folder


@pytest.fixture(scope="module")
def trained(tiny_backbone, sourced_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze-runs")
    good = tiny_recipe(tiny_backbone, sourced_dir, out, output={"dir": str(out / "good")},
                       train={"max_steps": 12, "eval_every": 12}).run().run_dir
    weak = tiny_recipe(tiny_backbone, sourced_dir, out, output={"dir": str(out / "weak")},
                       train={"max_steps": 3, "eval_every": 3, "lr": 1e-3, "seed": 3}).run().run_dir
    return {"good": good, "weak": weak, "root": out}


def test_analyze_a_run_writes_the_report_and_prints_a_summary(trained, capsys):
    run = trained["good"]
    assert main(["analyze", str(run), "--slice", "source", "--top-k", "3"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == "good: test split, 64 rows, 2 classes" and printed[1].startswith("accuracy ")
    assert printed[-1].startswith(f"report: {run / 'analysis' / 'report.md'}") and len(printed) <= 8
    folder = run / "analysis"
    assert sorted(p.name for p in folder.iterdir()) == ["analysis.json", "confusion.png", "reliability.png",
                                                        "report.md"]
    saved = json.loads((folder / "analysis.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert saved["accuracy"] == pytest.approx(metrics["test"]["accuracy"])  # the run's own test score
    assert saved["split"] == "test" and saved["rows"] == 64
    assert [r["group"] for r in saved["slices"]["source"]] == ["news", "web"]
    outputs = collect(run)
    assert outputs.columns == {"source": ["web", "news"] * 32} and outputs.probabilities.shape == (64, 2)
    assert main(["analyze", str(run), "--slice", "nosuch"]) == 2
    error = capsys.readouterr().err
    assert "--slice nosuch: split 'test' has no such column; its other columns are ['source']" in error


def test_analyze_an_ensemble_folder(trained, capsys):
    ensemble = trained["root"] / "ensemble"
    assert main(["ensemble", "--models", str(trained["good"]), str(trained["weak"]), "--output", str(ensemble)]) == 0
    capsys.readouterr()
    assert main(["analyze", str(ensemble), "--split", "validation"]) == 0
    assert "ensemble: validation split, 64 rows" in capsys.readouterr().out
    saved = json.loads((ensemble / "analysis" / "analysis.json").read_text())
    report = json.loads((ensemble / "ensemble_report.json").read_text())
    assert saved["accuracy"] == pytest.approx(report["ensemble"]["validation"]["accuracy"])
    assert main(["analyze", str(ensemble), "--fit-temperature"]) == 2
    assert "is an ensemble" in capsys.readouterr().err


def test_compare_two_runs(trained, tmp_path, capsys):
    out = tmp_path / "comparison"
    assert main(["analyze", str(trained["good"]), "--compare", str(trained["weak"]), "--output", str(out)]) == 0
    assert "McNemar exact p = " in capsys.readouterr().out
    section = json.loads((out / "analysis.json").read_text())["compare"]
    assert section["b"] == str(trained["weak"]) and section["rows"] == 64
    assert "## Comparison: good (A) and weak (B)" in (out / "report.md").read_text()
    renamed = tmp_path / "renamed"
    shutil.copytree(trained["weak"], renamed, ignore=shutil.ignore_patterns("analysis"))
    (renamed / "label_map.json").write_text(json.dumps({"0": "neg", "1": "pos"}))
    assert main(["analyze", str(trained["good"]), "--compare", str(renamed), "--output", str(out)]) == 2
    assert "label sets must be the same" in capsys.readouterr().err


def test_fit_temperature_is_stored_and_predict_applies_it(trained, tmp_path, capsys):
    from finetune.predict import load_run, predict

    run = tmp_path / "run"
    shutil.copytree(trained["good"], run, ignore=shutil.ignore_patterns("analysis"))
    texts = ["a great film", "the plot was dull and boring", "it was fine"]
    before = predict(load_run(run), texts)
    assert main(["analyze", str(run), "--fit-temperature"]) == 0
    assert "fitted on validation (64 rows)" in capsys.readouterr().out
    stored = json.loads((run / "calibration.json").read_text())
    assert stored["fitted_on"] == "validation" and stored["temperature"] > 0 and stored["temperature"] != 1
    assert {"ece_before", "ece_after", "nll_before", "nll_after"} <= set(stored)
    assert stored["validation_nll_after"] <= stored["validation_nll_before"]
    after = predict(load_run(run), texts)
    assert [r["label"] for r in after] == [r["label"] for r in before]
    assert all(a["probabilities"] != pytest.approx(b["probabilities"], abs=1e-4) for a, b in zip(after, before))
    saved = json.loads((run / "analysis" / "analysis.json").read_text())
    assert saved["calibration"]["temperature"] == pytest.approx(stored["temperature"])
    assert saved["temperature_scaling"]["ece_after"] == pytest.approx(stored["ece_after"])
    # a later analysis reads the stored temperature, as predict does
    assert collect(run).temperature == pytest.approx(stored["temperature"])


def test_token_classification_outputs_are_read_per_word_like_predict(tiny_backbone, ner_dir, tmp_path):
    """One tag per word at its first sub-word; words cut off by max_length are absent from gold and predictions."""
    from finetune.predict import load_run, predict

    run = tiny_recipe(tiny_backbone, ner_dir, tmp_path, task="token_classification",
                      data={"path": str(ner_dir), "columns": {"tokens": "tokens", "tags": "ner_tags"}, "max_length": 8},
                      train={"max_steps": 2, "eval_every": 2},
                      eval={"metrics": ["entity_f1"], "primary": "entity_f1"}).run().run_dir
    outputs = collect(run, "test")
    assert outputs.task == "token_classification" and len(outputs) == 32
    lengths = [len(g) for g in outputs.gold]
    assert lengths == [len(p) for p in outputs.predicted] == [len(p) for p in outputs.probabilities]
    assert all(n <= len(words) for n, words in zip(lengths, outputs.texts))
    assert any(n < len(words) for n, words in zip(lengths, outputs.texts))  # max_length 8 cuts some sentences
    tags = [json.loads(line)["ner_tags"] for line in (ner_dir / "test.jsonl").read_text().splitlines()]
    assert [[outputs.labels[i] for i in gold] for gold in outputs.gold] == [t[:n] for t, n in zip(tags, lengths)]
    predicted = predict(load_run(run), outputs.texts)
    assert [[outputs.labels[i] for i in p] for p in outputs.predicted] == [r["tags"] for r in predicted]
