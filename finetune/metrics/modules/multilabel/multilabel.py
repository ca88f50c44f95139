"""Multi-label classification scores from multi-hot rows, matching sklearn.metrics.

Each prediction and reference is one row of 0/1 per label (the same labels, in the same order, in
every row). F1 = 2 TP / (2 TP + FP + FN): micro pools the counts of every label, macro averages the
per-label F1 (a label never predicted nor present scores ``zero_division``, as in sklearn); exact match
is the share of rows whose predicted label set equals the reference set (sklearn's subset accuracy).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Micro and macro F1 over labels, and exact match of whole label sets, for multi-hot rows."
_CITATION = "Pedregosa et al., Scikit-learn: Machine Learning in Python, JMLR 12, 2011."
_KWARGS = """
Args:
    predictions (list of list of int): predicted label sets, one 0/1 per label.
    references (list of list of int): gold label sets, same shape.
    zero_division (float): the F1 of a label with no true and no predicted positive. Defaults to 0.0.
Returns:
    f1_micro, f1_macro, exact_match (float)
"""


class MultiLabel(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64")),
                                        "references": datasets.Sequence(datasets.Value("int64"))}),
        )

    def _compute(self, predictions, references, zero_division=0.0):
        predicted, gold = np.asarray(predictions, dtype=bool), np.asarray(references, dtype=bool)
        if predicted.shape != gold.shape or predicted.ndim != 2:
            raise ValueError(f"expected predictions and references of one shape (rows, labels), got "
                             f"{predicted.shape} and {gold.shape}")
        tp = (predicted & gold).sum(0).astype(float)  # per label
        wrong = (predicted ^ gold).sum(0).astype(float)  # FP + FN
        per_label = np.where(2 * tp + wrong > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), zero_division)
        pooled = 2 * tp.sum() + wrong.sum()
        return {"f1_micro": float(2 * tp.sum() / pooled) if pooled else float(zero_division),
                "f1_macro": float(per_label.mean()),
                "exact_match": float((predicted == gold).all(1).mean())}
