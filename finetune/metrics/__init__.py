"""Evaluation metrics by name, computed offline.

The names a recipe lists under ``eval.metrics`` map to evaluate modules shipped in
``finetune/metrics/modules/`` (``evaluate.load("accuracy")`` would fetch from the hub and
fail offline). Any other name is handed to ``evaluate.load`` unchanged, for online users.
"""

from __future__ import annotations

import difflib
import numbers
from pathlib import Path
from typing import Any, NamedTuple

import evaluate

MODULES_DIR = Path(__file__).parent / "modules"


class MetricSpec(NamedTuple):
    module: str
    """Folder under MODULES_DIR holding the evaluate module."""
    kwargs: dict[str, Any]
    """Keyword arguments for the module's compute()."""
    key: str
    """Key of the module's result that holds this metric."""
    tasks: tuple[str, ...] = ("classification",)
    """Recipe tasks whose predictions this metric can score."""


REGISTRY: dict[str, MetricSpec] = {"accuracy": MetricSpec("accuracy", {}, "accuracy")}
for _score in ("f1", "precision", "recall"):
    REGISTRY[_score] = MetricSpec("precision_recall_f1", {"average": "binary"}, _score)
    for _average in ("macro", "micro", "weighted"):
        REGISTRY[f"{_score}_{_average}"] = MetricSpec("precision_recall_f1", {"average": _average}, _score)
REGISTRY.update(
    matthews_correlation=MetricSpec("matthews_correlation", {}, "matthews_correlation"),
    mcc=MetricSpec("matthews_correlation", {}, "matthews_correlation"),
    pearson=MetricSpec("correlation", {}, "pearsonr", ("regression",)),
    spearman=MetricSpec("correlation", {}, "spearmanr", ("regression",)),
    entity_f1=MetricSpec("seqeval", {}, "overall_f1", ("token_classification",)),
    entity_precision=MetricSpec("seqeval", {}, "overall_precision", ("token_classification",)),
    entity_recall=MetricSpec("seqeval", {}, "overall_recall", ("token_classification",)),
    # multi-hot rows (finetune.tasks.multi_label); named apart from the single-label f1_micro/f1_macro
    multilabel_f1_micro=MetricSpec("multilabel", {}, "f1_micro", ("multi_label_classification",)),
    multilabel_f1_macro=MetricSpec("multilabel", {}, "f1_macro", ("multi_label_classification",)),
    exact_match=MetricSpec("multilabel", {}, "exact_match", ("multi_label_classification",)),
)

# Only consulted for hub metrics: every shipped metric is higher-is-better.
_LOWER_IS_BETTER = {"loss", "wer", "cer", "ter", "mse", "mae", "mape", "smape", "perplexity", "brier_score"}

# Loading an evaluate module costs time, so each is loaded once per process, on first use.
_SHIPPED: dict[str, evaluate.EvaluationModule] = {}
_HUB: dict[str, evaluate.EvaluationModule] = {}


BINARY_ONLY = {"f1", "precision", "recall"}
"""Scores of the positive class (label id 1): they need exactly two labels."""

DEFAULTS = {
    "classification": ["accuracy", "f1_macro"],
    "regression": ["pearson", "spearman"],
    "token_classification": ["entity_f1", "entity_precision", "entity_recall"],
    "multi_label_classification": ["multilabel_f1_micro", "multilabel_f1_macro", "exact_match"],
}
"""Metrics a recipe gets when it names none; the first is the primary one."""


def available_metrics() -> list[str]:
    """Metric names shipped with finetune (usable offline)."""
    return list(REGISTRY)


def greater_is_better(name: str) -> bool:
    """Whether a higher value of metric ``name`` (or ``name/key``) is better; False for loss and other errors."""
    if name in REGISTRY:
        return True
    return not any(part in _LOWER_IS_BETTER for part in name.lower().split("/"))


def _load_shipped(module: str) -> evaluate.EvaluationModule:
    if module not in _SHIPPED:
        # keep_in_memory: no arrow cache file on disk, which concurrent runs would fight over.
        _SHIPPED[module] = evaluate.load(str(MODULES_DIR / module), keep_in_memory=True)
    return _SHIPPED[module]


def _load_hub(name: str) -> evaluate.EvaluationModule:
    if name not in _HUB:
        try:
            _HUB[name] = evaluate.load(name, keep_in_memory=True)
        except Exception as e:
            close = difflib.get_close_matches(name, REGISTRY, n=3)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"Unknown metric {name!r}: it is not shipped with finetune (shipped: "
                f"{', '.join(REGISTRY)}), and loading it from the Hugging Face Hub with "
                f"evaluate.load({name!r}) failed with {type(e).__name__}: {str(e).rstrip('.')}.{hint}"
            ) from e
    return _HUB[name]


def _hub_scores(name: str, output: dict[str, Any]) -> dict[str, float]:
    """One float for a single-valued hub result, else ``name/key`` per numeric value."""
    scalars = {key: float(value) for key, value in output.items() if isinstance(value, numbers.Real)}
    if not scalars:
        raise ValueError(f"metric {name!r} returned no numeric value (keys: {sorted(output)})")
    if len(output) == 1:
        return {name: next(iter(scalars.values()))}
    return {f"{name}/{key}": value for key, value in scalars.items()}


class MetricSuite:
    """The metrics of one run: ``MetricSuite(["accuracy", "f1_macro"]).compute(preds, refs)``.

    Shipped names are checked here; any other name is loaded from the hub on first use
    (``load()`` forces that early), raising ValueError if it cannot be.
    """

    def __init__(self, names: list[str]):
        if isinstance(names, str) or not all(isinstance(name, str) and name for name in names):
            raise TypeError(f"metric names must be a list of non-empty strings, got {names!r}")
        if not names:
            raise ValueError(f"no metrics requested; choose from {', '.join(REGISTRY)}")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"metric names listed more than once: {', '.join(duplicates)}")
        self.names = list(names)

    def __repr__(self) -> str:
        return f"MetricSuite({self.names!r})"

    def load(self) -> None:
        """Load every module now, so an unusable hub metric fails before training, not after."""
        for name in self.names:
            if name in REGISTRY:
                _load_shipped(REGISTRY[name].module)
            else:
                _load_hub(name)

    def compute(self, predictions: Any, references: Any) -> dict[str, float]:
        """One float per requested name (``name/key`` for each value of a multi-valued hub metric)."""
        results: dict[str, float] = {}
        outputs: dict[tuple, dict[str, Any]] = {}  # entity_f1/_precision/_recall share one call
        for name in self.names:
            spec = REGISTRY.get(name)
            if spec is None:
                output = _load_hub(name).compute(predictions=predictions, references=references)
                results.update(_hub_scores(name, output))
                continue
            call = (spec.module, tuple(sorted(spec.kwargs.items())))
            if call not in outputs:
                module = _load_shipped(spec.module)
                outputs[call] = module.compute(predictions=predictions, references=references, **spec.kwargs)
            results[name] = float(outputs[call][spec.key])
        return results
