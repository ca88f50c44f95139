import ast
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before evaluate reads it: the unknown-name test must not hit the network

import evaluate
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from finetune import metrics
from finetune.metrics import MetricSuite, available_metrics, greater_is_better

CLASSIFICATION = [n for n in available_metrics() if n.split("_")[0] in ("accuracy", "f1", "precision", "recall")]
CLASSIFICATION += ["matthews_correlation", "mcc"]
MULTICLASS = [n for n in CLASSIFICATION if n not in ("f1", "precision", "recall")]


def sklearn_score(name, predictions, references):
    if name == "accuracy":
        return skm.accuracy_score(references, predictions)
    if name in ("matthews_correlation", "mcc"):
        return skm.matthews_corrcoef(references, predictions)
    kind, _, average = name.partition("_")
    score = {"f1": skm.f1_score, "precision": skm.precision_score, "recall": skm.recall_score}[kind]
    return score(references, predictions, average=average or "binary", zero_division=0)


def assert_matches_sklearn(names, predictions, references):
    results = MetricSuite(names).compute(predictions, references)
    assert list(results) == names
    for name in names:
        assert results[name] == pytest.approx(sklearn_score(name, predictions, references)), name


def test_registry_names():
    required = {
        "accuracy", "f1", "f1_macro", "f1_micro", "f1_weighted", "precision", "precision_macro",
        "precision_micro", "recall", "recall_macro", "recall_micro", "matthews_correlation", "mcc",
        "pearson", "spearman", "entity_f1", "entity_precision", "entity_recall",
    }  # fmt: skip
    assert required <= set(available_metrics())
    assert all(greater_is_better(name) for name in available_metrics())
    assert not greater_is_better("wer") and not greater_is_better("evaluate-metric/wer")
    assert greater_is_better("rouge/rouge1")


@pytest.mark.parametrize("seed", range(4))
def test_binary_random_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    references = rng.integers(0, 2, size=rng.integers(5, 60))
    predictions = np.where(rng.random(len(references)) < 0.7, references, 1 - references)
    assert_matches_sklearn(CLASSIFICATION, predictions, references)


@pytest.mark.parametrize("seed,n_classes", [(0, 3), (1, 4), (2, 5), (3, 7)])
def test_multiclass_random_matches_sklearn(seed, n_classes):
    rng = np.random.default_rng(seed)
    references = rng.integers(0, n_classes, size=40)
    predictions = np.where(rng.random(40) < 0.5, references, rng.integers(0, n_classes, size=40))
    assert_matches_sklearn(MULTICLASS, predictions, references)


@pytest.mark.filterwarnings("ignore:A single label was found")  # sklearn's matthews_corrcoef
@pytest.mark.parametrize(
    "predictions,references",
    [
        ([0, 0, 0, 0], [0, 0, 0, 0]),  # all one class, pos_label absent: zero_division everywhere
        ([1, 1, 1], [1, 1, 1]),
        ([0, 0, 0], [1, 1, 1]),  # positive class never predicted
        ([1, 1, 1], [0, 0, 0]),  # positive class never present
        ([1], [0]),
    ],
)
def test_binary_edge_cases_match_sklearn(predictions, references):
    assert_matches_sklearn(CLASSIFICATION, predictions, references)


@pytest.mark.filterwarnings("ignore:A single label was found")
@pytest.mark.parametrize(
    "predictions,references",
    [
        ([0, 0, 0, 0, 0, 0], [0, 1, 2, 0, 1, 2]),  # classes 1 and 2 never predicted
        ([0, 1, 2, 3, 3, 3], [0, 1, 2, 2, 2, 2]),  # class 3 only predicted
        ([2, 2, 2], [2, 2, 2]),
    ],
)
def test_multiclass_edge_cases_match_sklearn(predictions, references):
    assert_matches_sklearn(MULTICLASS, predictions, references)


def test_module_kwargs_match_sklearn():
    rng = np.random.default_rng(7)
    references, predictions = rng.integers(0, 4, size=50), rng.integers(0, 4, size=50)
    for kind, score in [("f1", skm.f1_score), ("precision", skm.precision_score), ("recall", skm.recall_score)]:
        module = metrics._load_shipped("precision_recall_f1")
        for kwargs in [
            {"average": "macro", "labels": [0, 2]},
            {"average": "micro", "labels": [1, 3, 5]},
            {"average": "weighted", "labels": [5, 6]},  # no support: sklearn falls back to the plain mean
            {"average": None},
            {"average": "macro", "labels": [0, 9], "zero_division": 1.0},
        ]:
            got = module.compute(predictions=predictions, references=references, **kwargs)[kind]
            assert got == pytest.approx(score(references, predictions, **{"zero_division": 0, **kwargs})), (kind, kwargs)
        binary = (references > 1).astype(int), (predictions > 1).astype(int)
        got = module.compute(predictions=binary[1], references=binary[0], pos_label=0)[kind]
        assert got == pytest.approx(score(*binary, pos_label=0))
        with pytest.raises(ValueError, match="multiclass"):
            module.compute(predictions=predictions, references=references)
        with pytest.raises(ValueError, match="pos_label"):
            module.compute(predictions=[0, 2, 2], references=[2, 0, 2])


def test_correlations_match_scipy():
    rng = np.random.default_rng(0)
    references = rng.normal(size=30)
    predictions = references + rng.normal(scale=0.5, size=30)
    predictions[:3] = predictions[3]  # ties, for spearman's ranks
    results = MetricSuite(["pearson", "spearman"]).compute(predictions, references)
    assert results["pearson"] == pytest.approx(stats.pearsonr(references, predictions)[0])
    assert results["spearman"] == pytest.approx(stats.spearmanr(references, predictions)[0])


SEQEVAL_CASES = [
    # (predictions, references, (precision, recall, f1), accuracy)
    ([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-LOC"]], (1, 1, 1), 1),
    # An I- after O opens an entity, so O I-PER I-PER equals O B-PER I-PER.
    ([["O", "B-PER", "I-PER", "O"]], [["O", "I-PER", "I-PER", "O"]], (1, 1, 1), 0.75),
    # A type change inside a span splits it: PER(0) + LOC(1) against PER(0-1).
    ([["B-PER", "I-LOC"]], [["B-PER", "I-PER"]], (0, 0, 0), 0.5),
    # Entities never run across sentences: PER(1) and PER(3) both ways.
    ([["O", "B-PER"], ["B-PER", "O"]], [["O", "B-PER"], ["I-PER", "O"]], (1, 1, 1), 0.75),
    # Refs PER, LOC, ORG; preds PER, ORG, ORG -> 2 of 3 right each way.
    (
        [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-ORG"]],
        [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]],
        (2 / 3, 2 / 3, 2 / 3),
        4 / 6,
    ),
    ([["O", "O"]], [["O", "O"]], (0, 0, 0), 1),  # no entities at all
]


@pytest.mark.parametrize("predictions,references,prf,accuracy", SEQEVAL_CASES)
def test_seqeval_known_answers(predictions, references, prf, accuracy):
    results = MetricSuite(["entity_precision", "entity_recall", "entity_f1"]).compute(predictions, references)
    assert list(results.values()) == pytest.approx(prf)
    full = metrics._load_shipped("seqeval").compute(predictions=predictions, references=references)
    assert full["overall_accuracy"] == pytest.approx(accuracy)


def test_seqeval_per_type():
    predictions, references, _, _ = SEQEVAL_CASES[4]
    results = metrics._load_shipped("seqeval").compute(predictions=predictions, references=references)
    assert results["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "number": 1}
    assert results["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "number": 1}
    assert results["ORG"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "number": 1})
    results = metrics._load_shipped("seqeval").compute(predictions=[["B-PER", "I-LOC"]], references=[["B-PER", "I-PER"]])
    assert results["LOC"]["number"] == 0 and results["PER"]["number"] == 1


def test_unknown_metric_offline_is_a_clear_error():
    suite = MetricSuite(["accuracy", "no_such_metric_xyz"])  # hub names resolve lazily
    with pytest.raises(ValueError) as error:
        suite.compute([0, 1], [0, 1])
    message = str(error.value)
    assert "'no_such_metric_xyz'" in message and "not shipped with finetune" in message
    assert "entity_f1" in message and "Hub" in message and "failed" in message


def test_hub_error_includes_original(monkeypatch):
    def fail(name, **kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(metrics, "_HUB", {})
    monkeypatch.setattr(evaluate, "load", fail)
    with pytest.raises(ValueError, match="ConnectionError: network unreachable"):
        MetricSuite(["bleu"]).load()
    with pytest.raises(ValueError, match="Did you mean 'f1_macro'"):
        MetricSuite(["f1_macr"]).load()


def test_hub_results_are_flattened(monkeypatch):
    class Fake:
        def __init__(self, output):
            self.output = output

        def compute(self, predictions, references):
            return self.output

    monkeypatch.setattr(metrics, "_HUB", {"one": Fake({"x": np.float32(0.5)}), "many": Fake({"a": 1, "b": 2.5, "c": [1]})})
    assert MetricSuite(["one", "many"]).compute([0], [0]) == {"one": 0.5, "many/a": 1.0, "many/b": 2.5}


def test_modules_load_once_and_share(monkeypatch):
    loads = []
    real_load = evaluate.load
    monkeypatch.setattr(metrics, "_SHIPPED", {})
    monkeypatch.setattr(evaluate, "load", lambda path, **kw: loads.append(path) or real_load(path, **kw))
    suite = MetricSuite(["f1", "f1_macro", "mcc", "matthews_correlation"])
    assert loads == []  # nothing loads before it is needed
    suite.compute([0, 1, 1], [0, 1, 0])
    MetricSuite(["f1_micro"]).compute([0, 1, 1], [0, 1, 0])
    assert sorted(os.path.basename(p) for p in loads) == ["matthews_correlation", "precision_recall_f1"]


def test_suite_validates_names():
    with pytest.raises(TypeError):
        MetricSuite("accuracy")
    with pytest.raises(TypeError):
        MetricSuite(["accuracy", ""])
    with pytest.raises(ValueError, match="no metrics"):
        MetricSuite([])
    with pytest.raises(ValueError, match="more than once: f1"):
        MetricSuite(["f1", "accuracy", "f1"])


def test_modules_import_only_allowed_libraries():
    for path in sorted(metrics.MODULES_DIR.glob("*/*.py")):
        assert path.stem == path.parent.name
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                # evaluate's import scanner misreads `import a, b`, so one module per line
                assert len(node.names) == 1, path
                names = [node.names[0].name]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module]
            else:
                continue
            assert {n.split(".")[0] for n in names} <= {"numpy", "scipy", "datasets", "evaluate"}, path


def test_seqeval_reads_tags_without_a_prefix_as_entity_types():
    """Plain tags (PER, XER) are entity types, as finetune analyze reads them: seqeval itself would read
    prefix "P", type "ER" and merge PER with XER."""
    results = metrics._load_shipped("seqeval").compute(predictions=[["PER", "PER", "O", "XER"]],
                                                       references=[["PER", "PER", "O", "PER"]])
    assert set(results) >= {"PER"} and "ER" not in results
    assert results["PER"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "number": 2})
