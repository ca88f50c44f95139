"""Spearman rank correlation between predictions and references (scipy.stats.spearmanr)."""

import datasets
import evaluate
from scipy import stats

_DESCRIPTION = "The Spearman rank-order correlation coefficient is the Pearson correlation of the ranks of the two variables; it measures monotonic association, from -1 to +1."
_CITATION = "Virtanen et al., SciPy 1.0: Fundamental Algorithms for Scientific Computing in Python, Nature Methods 17, 2020."
_KWARGS = """
Args:
    predictions (list of float): predicted values.
    references (list of float): ground-truth values.
    return_pvalue (bool): also return the two-sided p-value. Defaults to False.
Returns:
    spearmanr (float): NaN when either input is constant.
    p-value (float): only with return_pvalue=True.
"""


class Spearmanr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references, return_pvalue=False):
        statistic, pvalue = stats.spearmanr(references, predictions)
        if return_pvalue:
            return {"spearmanr": float(statistic), "p-value": float(pvalue)}
        return {"spearmanr": float(statistic)}
