"""Pearson linear correlation between predictions and references (scipy.stats.pearsonr)."""

import datasets
import evaluate
from scipy import stats

_DESCRIPTION = "The Pearson correlation coefficient measures the linear relationship between two variables, from -1 to +1."
_CITATION = "Virtanen et al., SciPy 1.0: Fundamental Algorithms for Scientific Computing in Python, Nature Methods 17, 2020."
_KWARGS = """
Args:
    predictions (list of float): predicted values.
    references (list of float): ground-truth values.
    return_pvalue (bool): also return the two-sided p-value. Defaults to False.
Returns:
    pearsonr (float): NaN when either input is constant.
    p-value (float): only with return_pvalue=True.
"""


class Pearsonr(evaluate.Metric):
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
        statistic, pvalue = stats.pearsonr(references, predictions)
        if return_pvalue:
            return {"pearsonr": float(statistic), "p-value": float(pvalue)}
        return {"pearsonr": float(statistic)}
