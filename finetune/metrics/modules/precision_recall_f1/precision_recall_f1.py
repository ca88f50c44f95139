"""Precision, recall and F1 (binary or averaged over classes), matching sklearn.metrics.

One module computes all three from the same counts; the recipe names f1, precision_macro,
recall_micro, ... pick the score and the average.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN); "
    "binary (of pos_label) or averaged over labels (macro, micro, weighted)."
)
_CITATION = "Pedregosa et al., Scikit-learn: Machine Learning in Python, JMLR 12, 2011."
_KWARGS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    average (str): "binary" (score of pos_label), "macro", "micro", "weighted", or None (one score per label).
    labels (list of int, optional): labels to score; default: every label seen.
    pos_label (int): the positive class when average="binary". Defaults to 1.
    zero_division (float): score used where a ratio divides by zero. Defaults to 0.0.
Returns:
    precision, recall, f1 (float, or list of float when average=None)
"""


def _counts(predictions, references, labels, pos_label, average):
    """Per-label (true positives, predicted, actual) counts, with sklearn's label selection."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    present = np.union1d(predictions, references)
    if average == "binary":
        if len(present) > 2:
            raise ValueError("Target is multiclass but average='binary'; use 'macro', 'micro' or 'weighted'.")
        if pos_label not in present and len(present) == 2:
            raise ValueError(f"pos_label={pos_label} is not a valid label; it should be one of {present.tolist()}")
        labels = [pos_label]
    elif average not in ("macro", "micro", "weighted", None):
        raise ValueError(f"average must be 'binary', 'macro', 'micro', 'weighted' or None, not {average!r}")
    labels = present if labels is None else np.asarray(labels)
    tp = np.array([np.sum((predictions == x) & (references == x)) for x in labels], dtype=float)
    pred = np.array([np.sum(predictions == x) for x in labels], dtype=float)
    true = np.array([np.sum(references == x) for x in labels], dtype=float)
    if average == "micro":
        return tp.sum(keepdims=True), pred.sum(keepdims=True), true.sum(keepdims=True)
    return tp, pred, true


def _average(scores, support, average):
    if average is None:
        return scores.tolist()
    keep = ~np.isnan(scores)  # zero_division=nan drops those labels, as sklearn does
    if not keep.any():
        return float("nan")
    weights = support[keep] if average == "weighted" and support[keep].sum() > 0 else None
    return float(np.average(scores[keep], weights=weights))


def _ratio(numerator, denominator, zero_division):
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1), zero_division)


class PrecisionRecallF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", zero_division=0.0):
        tp, pred, true = _counts(predictions, references, labels, pos_label, average)
        return {
            "precision": _average(_ratio(tp, pred, zero_division), true, average),
            "recall": _average(_ratio(tp, true, zero_division), true, average),
            "f1": _average(_ratio(2 * tp, pred + true, zero_division), true, average),
        }
