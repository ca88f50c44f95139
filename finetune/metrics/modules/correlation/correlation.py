"""Pearson and Spearman correlation between predictions and references (scipy.stats)."""

import datasets
import evaluate
from scipy import stats

_DESCRIPTION = (
    "Pearson's r measures the linear relationship between predictions and references; Spearman's rho "
    "the monotonic one (Pearson's r of the ranks). Both range from -1 to +1, NaN when an input is constant."
)
_CITATION = "Virtanen et al., SciPy 1.0: Fundamental Algorithms for Scientific Computing in Python, Nature Methods 17, 2020."
_KWARGS = """
Args:
    predictions (list of float): predicted values.
    references (list of float): ground-truth values.
Returns:
    pearsonr (float), spearmanr (float)
"""


class Correlation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references):
        return {
            "pearsonr": float(stats.pearsonr(references, predictions)[0]),
            "spearmanr": float(stats.spearmanr(references, predictions)[0]),
        }
