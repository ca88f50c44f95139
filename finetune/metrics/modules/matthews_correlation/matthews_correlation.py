"""Matthews correlation coefficient (multi-class), matching sklearn.metrics.matthews_corrcoef."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "The Matthews correlation coefficient measures the quality of classifications, from -1 (total "
    "disagreement) through 0 (chance) to +1 (perfect). The multi-class form is Gorodkin's R_K statistic."
)
_CITATION = "Gorodkin, Comparing two K-category assignments by a K-category correlation coefficient, 2004."
_KWARGS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
Returns:
    matthews_correlation (float): 0.0 when either side holds a single class (undefined correlation).
"""


class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        labels = np.union1d(predictions, references)
        t_sum = np.array([np.sum(references == x) for x in labels], dtype=float)
        p_sum = np.array([np.sum(predictions == x) for x in labels], dtype=float)
        n_correct = float(np.sum(predictions == references))
        n = float(len(references))
        cov_tp = n_correct * n - t_sum @ p_sum
        cov_pp = n * n - p_sum @ p_sum
        cov_tt = n * n - t_sum @ t_sum
        if cov_pp * cov_tt == 0:
            return {"matthews_correlation": 0.0}
        return {"matthews_correlation": float(cov_tp / np.sqrt(cov_tt * cov_pp))}
