"""The per-task analyses of ``finetune analyze`` (token classification, regression, multi-label) on small
handcrafted outputs: numbers checked by hand or against numpy / scipy / sklearn, edge cases, PNGs written."""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

import finetune
from finetune.analysis import multi_label, plotting, regression
from finetune.analysis import token_classification as tc
from finetune.analysis.outputs import SplitOutputs
from finetune.analysis.text import clean, table

BIO = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def _png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _no_temporary_files(folder) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# --- token classification -------------------------------------------------------------------------

def _tagged(sentences: list[tuple[str, str, str]], labels: list[str] = BIO) -> SplitOutputs:
    """Outputs from (words, gold tags, predicted tags), each a space-separated string."""
    ids = {tag: i for i, tag in enumerate(labels)}
    return SplitOutputs(
        task="token_classification", split="test", model="runs/ner-1", pairs=None, labels=labels,
        texts=[words.split() for words, _, _ in sentences],
        gold=[np.array([ids[t] for t in gold.split()]) for _, gold, _ in sentences],
        predicted=[np.array([ids[t] for t in predicted.split()]) for _, _, predicted in sentences])


HAND_CHECKED = [
    # PER too short (boundary), ORG read as PER on the same span (type), LOC right
    ("John Smith works at Acme Corp in Paris",
     "B-PER I-PER O O B-ORG I-ORG O B-LOC", "B-PER O O O B-PER I-PER O B-LOC"),
    # PER missed; LOC overlapped by a longer MISC (boundary and type)
    ("Bob visited Berlin yesterday", "B-PER O B-LOC O", "O O B-MISC I-MISC"),
    # a MISC where there is nothing (spurious)
    ("nothing here", "O O", "B-MISC O"),
    # an I- after O starts an entity (conlleval), so this PER is right
    ("x Ann", "O I-PER", "O B-PER"),
]


def test_entity_scores_and_error_categories_on_a_hand_checked_example(tmp_path):
    result = tc.analyze(_tagged(HAND_CHECKED), tmp_path, k=2)
    s = result.summary
    # gold: PER 3, ORG 1, LOC 2; predicted: PER 3, LOC 1, MISC 2; right: LOC (row 0), PER (row 3)
    assert (s["entities_gold"], s["entities_predicted"], s["entities_correct"]) == (6, 6, 2)
    assert s["entity_precision"] == pytest.approx(2 / 6) and s["entity_recall"] == pytest.approx(2 / 6)
    assert s["entity_f1"] == pytest.approx(1 / 3)
    per = s["per_type"]
    assert per["PER"] == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3, "support": 3,
                                        "predicted": 3, "correct": 1}, abs=1e-6)
    assert per["LOC"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2,
                                        "predicted": 1, "correct": 1}, abs=1e-6)
    assert per["ORG"]["support"] == 1 and per["ORG"]["predicted"] == 0 and per["ORG"]["f1"] == 0.0
    assert per["MISC"]["support"] == 0 and per["MISC"]["predicted"] == 2 and per["MISC"]["precision"] == 0.0
    assert s["never_predicted"] == ["ORG"]
    assert s["errors"] == {"boundary": 1, "type": 1, "boundary_and_type": 1, "missed": 1, "spurious": 1}
    assert s["boundary_errors"] == {"too_short": 1}
    assert s["token_accuracy"] == pytest.approx(8 / 16)
    assert {(c["kind"], c["gold"], c["predicted"]) for c in s["confusions"]} == {
        ("boundary", "PER", "PER"), ("type", "ORG", "PER"), ("boundary_and_type", "LOC", "MISC"),
        ("missed", "PER", None), ("spurious", None, "MISC")}
    # the two rows with most errors, most first; wrong words marked [gold|predicted]
    assert [e["row"] for e in s["examples"]] == [0, 1] and s["examples"][0]["errors"] == 2
    assert "Smith[I-PER|O]" in s["examples"][0]["marked"] and "Acme[B-ORG|B-PER]" in s["examples"][0]["marked"]
    assert "ORG as PER 'Acme Corp'" in s["examples"][0]["what"]
    json.dumps(s)
    assert "| PER " in result.markdown and "token_entity_f1.png" in result.markdown
    assert len(result.console) <= 8
    assert [p.name for p in result.figures] == ["token_entity_f1.png"] and _png(result.figures[0])
    assert _no_temporary_files(tmp_path)


def _shipped_get_entities():
    """The run metric's own chunker (the shipped seqeval module), read without importing evaluate (slow)."""
    source = (Path(finetune.__file__).parent / "metrics" / "modules" / "seqeval" / "seqeval.py").read_text()
    wanted = {"_split", "_ends", "_starts", "get_entities"}
    tree = ast.Module([n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name in wanted],
                      type_ignores=[])
    namespace: dict = {}
    exec(compile(tree, "seqeval.py", "exec"), namespace)  # noqa: S102 (our own shipped file)
    return namespace["get_entities"]


def test_spans_match_the_run_metric_chunker_on_random_tag_sequences():
    get_entities = _shipped_get_entities()
    rng = random.Random(0)
    tags = BIO + ["B-X", "I-X", "E-PER", "S-PER", "E-X", "S-X"]
    for _ in range(300):
        sentence = [rng.choice(tags) for _ in range(rng.randint(0, 12))]
        ours = {(s.type, s.start, s.end) for s in tc.entity_spans(sentence)}
        assert ours == get_entities([sentence]), sentence


def test_entity_scores_match_the_run_metric_on_random_predictions():
    get_entities = _shipped_get_entities()
    rng = random.Random(1)
    gold = [[rng.choice(BIO) for _ in range(rng.randint(1, 10))] for _ in range(200)]
    predicted = [[t if rng.random() < 0.7 else rng.choice(BIO) for t in sentence] for sentence in gold]
    ours = tc.entity_scores([tc.entity_spans(s) for s in gold], [tc.entity_spans(s) for s in predicted])
    true, pred = get_entities(gold), get_entities(predicted)  # offsets over the joined sentences
    assert (ours["gold"], ours["predicted"], ours["correct"]) == (len(true), len(pred), len(true & pred))
    for type_ in {e[0] for e in true | pred}:
        assert ours["per_type"][type_]["correct"] == len({e for e in true & pred if e[0] == type_})


def test_tags_without_prefix_and_bioes_are_read_as_entities():
    assert tc.entity_spans(["PER", "PER", "O", "LOC", "PER"]) == [("PER", 0, 1), ("LOC", 3, 3), ("PER", 4, 4)]
    assert tc.entity_spans(["S-PER", "B-LOC", "E-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2), ("LOC", 3, 3)]
    assert tc.entity_spans(["U-PER", "B-LOC", "L-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]
    assert tc.entity_spans([]) == []


def test_plain_tags_analysis(tmp_path):
    labels = ["O", "PER", "LOC"]
    s = tc.analyze(_tagged([("a b c d", "PER PER O LOC", "PER O O PER")], labels), tmp_path).summary
    assert s["scheme"].startswith("plain")
    assert s["errors"]["boundary"] == 1 and s["errors"]["type"] == 1
    assert s["boundary_errors"] == {"too_short": 1}


def test_boundary_details_and_tie_of_overlapping_predictions():
    too_long = tc.classify_errors(0, [tc.Span("PER", 1, 1)], [tc.Span("PER", 0, 2)])
    shifted = tc.classify_errors(0, [tc.Span("PER", 1, 2)], [tc.Span("PER", 2, 3)])
    assert [tc.boundary_detail(e) for e in too_long + shifted] == ["too_long", "shifted"]
    # one prediction spanning two gold entities: two boundary errors, nothing spurious
    merged = tc.classify_errors(0, [tc.Span("PER", 0, 0), tc.Span("PER", 1, 1)], [tc.Span("PER", 0, 1)])
    assert [e.kind for e in merged] == ["boundary", "boundary"]


def test_token_analysis_with_no_entities_at_all(tmp_path):
    result = tc.analyze(_tagged([("a b", "O O", "O O")]), tmp_path)
    s = result.summary
    assert s["entity_f1"] == 0.0 and s["per_type"] == {} and s["token_accuracy"] == 1.0
    assert sum(s["errors"].values()) == 0 and s["examples"] == [] and result.figures == []
    assert result.console and result.markdown


def test_token_rows_of_different_lengths_raise(tmp_path):
    outputs = _tagged([("a b", "O O", "O O")])
    outputs.predicted = [np.array([0])]
    with pytest.raises(ValueError, match="row 0"):
        tc.analyze(outputs, tmp_path)


# --- regression -----------------------------------------------------------------------------------

def _regression(gold, predicted, pairs=True) -> SplitOutputs:
    n = len(gold)
    return SplitOutputs(task="regression", split="validation", model="runs/sts-1", labels=None,
                        texts=[f"text {i}" for i in range(n)], pairs=[f"pair {i}" for i in range(n)] if pairs else None,
                        gold=np.asarray(gold, dtype=float), predicted=np.asarray(predicted, dtype=float))


def test_regression_numbers_match_numpy_and_scipy(tmp_path):
    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 200)
    predicted = 2.5 + 0.8 * (gold - 2.5) + rng.normal(0, 0.4, 200)
    result = regression.analyze(_regression(gold, predicted), tmp_path, k=3)
    s, residual = result.summary, predicted - gold
    assert s["mae"] == pytest.approx(np.mean(np.abs(residual)), abs=1e-6)
    assert s["rmse"] == pytest.approx(np.sqrt(np.mean(residual ** 2)), abs=1e-6)
    assert s["r2"] == pytest.approx(skm.r2_score(gold, predicted), abs=1e-6)
    assert s["pearson"] == pytest.approx(stats.pearsonr(gold, predicted)[0], abs=1e-6)
    assert s["spearman"] == pytest.approx(stats.spearmanr(gold, predicted)[0], abs=1e-6)
    assert s["bias"] == pytest.approx(residual.mean(), abs=1e-6)
    worst = np.argsort(-np.abs(residual))[:3]
    assert [w["row"] for w in s["worst"]] == list(worst)
    assert s["worst"][0]["pair"] == f"pair {worst[0]}" and s["worst"][0]["error"] == pytest.approx(residual[worst[0]], abs=1e-6)
    # shrinking towards the mean: the extremes are the worst buckets, over-estimated low, under-estimated high
    buckets = s["by_target_bucket"]
    assert len(buckets) == 5 and sum(b["rows"] for b in buckets) == 200
    assert buckets[0]["bias"] > 0 > buckets[-1]["bias"]
    assert s["worst_bucket"]["bucket"] in (0, 4)
    json.dumps(s)
    assert {p.name for p in result.figures} == {"regression_residuals.png", "regression_predicted_vs_gold.png"}
    assert all(_png(p) for p in result.figures) and _no_temporary_files(tmp_path)
    assert len(result.console) <= 8 and "| pair" in result.markdown


def test_quantile_buckets_split_evenly_and_merge_ties():
    assert regression.quantile_buckets(np.arange(10.0), 5).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    tied = regression.quantile_buckets(np.array([1.0] * 8 + [2.0, 3.0]), 5)
    assert tied.max() < 5 and tied[:8].tolist() == [0] * 8
    table = regression.bucket_table(np.arange(10.0), np.arange(10.0) + np.array([0] * 8 + [3, 3]))
    assert table[-1]["low"] == 8 and table[-1]["mae"] == 3 and table[0]["mae"] == 0


def test_regression_edge_cases(tmp_path):
    constant = regression.analyze(_regression([2.0, 2.0, 2.0], [1.0, 2.0, 3.0], pairs=False), tmp_path).summary
    assert constant["r2"] is None and constant["pearson"] is None and constant["mae"] == pytest.approx(2 / 3)
    assert "pair" not in constant["worst"][0]
    with_nan = regression.analyze(_regression([1.0, 2.0, 3.0, 4.0], [1.5, np.nan, 3.0, 4.0]), tmp_path).summary
    assert with_nan["non_finite_rows"] == 1 and with_nan["mae"] == pytest.approx(0.5 / 3)
    assert [w["row"] for w in with_nan["worst"]][:1] == [0]
    empty = regression.analyze(_regression([], []), tmp_path / "empty")
    assert empty.summary["mae"] is None and empty.figures == [] and empty.console


# --- multi-label ----------------------------------------------------------------------------------

def _multi_label(n=120, seed=0) -> SplitOutputs:
    rng = np.random.default_rng(seed)
    labels = ["sports", "politics", "a_label_with_a_very_long_name_indeed", "never_present"]
    gold = (rng.random((n, 4)) < [0.5, 0.3, 0.2, 0.0]).astype(int)
    probabilities = np.clip(gold * 0.35 + rng.uniform(0, 0.65, (n, 4)), 0, 1)
    probabilities[:, 1] *= 0.5  # politics: rarely above its threshold
    thresholds = np.array([0.5, 0.45, 0.4, 0.99])
    return SplitOutputs(task="multi_label", split="test", model="runs/ml-1", pairs=None, labels=labels,
                        texts=[f"row {i}" for i in range(n)], gold=gold, probabilities=probabilities,
                        predicted=(probabilities > thresholds).astype(int), thresholds=thresholds)


def test_multi_label_scores_match_sklearn(tmp_path):
    outputs = _multi_label()
    result = multi_label.analyze(outputs, tmp_path, k=4)
    s, gold, predicted = result.summary, outputs.gold, outputs.predicted
    precision, recall, f1, support = skm.precision_recall_fscore_support(gold, predicted, zero_division=0)
    for c, label in enumerate(outputs.labels):
        e = s["per_label"][label]
        assert (e["precision"], e["recall"], e["f1"]) == pytest.approx((precision[c], recall[c], f1[c]), abs=1e-6)
        assert e["support"] == support[c] and e["predicted"] == predicted[:, c].sum()
    assert s["micro_f1"] == pytest.approx(skm.f1_score(gold, predicted, average="micro", zero_division=0), abs=1e-6)
    assert s["macro_f1"] == pytest.approx(skm.f1_score(gold, predicted, average="macro", zero_division=0), abs=1e-6)
    assert s["exact_match"] == pytest.approx(skm.accuracy_score(gold, predicted), abs=1e-6)
    assert s["hamming_loss"] == pytest.approx(skm.hamming_loss(gold, predicted), abs=1e-6)
    assert s["cardinality"]["gold_mean"] == pytest.approx(gold.sum(1).mean(), abs=1e-6)
    assert s["cardinality"]["predicted_mean"] == pytest.approx(predicted.sum(1).mean(), abs=1e-6)
    assert sum(v["gold"] for v in s["cardinality"]["rows_by_count"].values()) == len(gold)
    assert s["no_positives"] == ["never_present"] and "never_present" in s["never_predicted"]
    json.dumps(s)


def test_threshold_curves_are_f1_at_each_threshold(tmp_path):
    outputs = _multi_label()
    s = multi_label.analyze(outputs, tmp_path).summary
    curves = s["threshold_curves"]
    assert curves["thresholds"][0] == 0.0 and curves["thresholds"][-1] == 1.0 and len(curves["thresholds"]) == 101
    for t in (0.0, 0.3, 0.55, 0.9):
        i = curves["thresholds"].index(t)
        expected = skm.f1_score(outputs.gold, outputs.probabilities > t, average=None, zero_division=0)
        assert [curves["f1"][label][i] for label in outputs.labels] == pytest.approx(expected, abs=1e-4)
    for label, e in s["per_label"].items():
        assert e["best_f1"] == pytest.approx(max(curves["f1"][label]), abs=1e-4)
        assert e["best_f1"] >= e["f1"] - 0.02  # the current threshold is between grid points at worst


def test_worst_rows_and_figures(tmp_path):
    outputs = _multi_label()
    result = multi_label.analyze(outputs, tmp_path, k=3)
    wrong = (outputs.gold != outputs.predicted).sum(1)
    rows = result.summary["worst_rows"]
    assert len(rows) == 3 and [w["wrong"] for w in rows] == sorted(wrong, reverse=True)[:3]
    for w in rows:
        assert set(w["gold"]) == {outputs.labels[c] for c in np.flatnonzero(outputs.gold[w["row"]])}
        assert len(w["missed"]) + len(w["extra"]) == w["wrong"]
    assert {p.name for p in result.figures} == {"multi_label_f1.png", "multi_label_threshold_curves.png"}
    assert all(_png(p) for p in result.figures) and _no_temporary_files(tmp_path)
    assert "never_present" in result.markdown and len(result.console) <= 8


def test_multi_label_without_probabilities_or_predictions(tmp_path):
    outputs = _multi_label(n=20)
    predicted = outputs.predicted
    outputs.predicted = None
    assert multi_label.analyze(outputs, tmp_path).summary["micro_f1"] == pytest.approx(
        skm.f1_score(outputs.gold, predicted, average="micro", zero_division=0), abs=1e-6)
    outputs.predicted, outputs.probabilities = predicted, None
    result = multi_label.analyze(outputs, tmp_path / "no_probabilities")
    assert result.summary["threshold_curves"] is None and "best_threshold" not in result.summary["per_label"]["sports"]
    assert [p.name for p in result.figures] == ["multi_label_f1.png"]


# --- shared helpers -------------------------------------------------------------------------------

def test_table_aligns_columns_and_clean_makes_json():
    text = table(["name", "score", "n"], [["a|b", 0.5, 1234], ["long name", None, 7]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1  # padded to one width
    assert lines[1].endswith(":|") and "a\\|b" in text and "1,234" in text and "–" in text
    assert clean({"x": np.float64("nan"), "y": np.int64(3), "z": np.array([0.000123456789123])}) == {
        "x": None, "y": 3, "z": [0.00012345679]}
    assert plotting.short("x" * 30) == "x" * 23 + "…"
