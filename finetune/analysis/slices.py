"""A metric broken down by group: rows grouped by the value of a column (numbers with many values in quantile
buckets), or by input length in words."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from finetune.analysis.outputs import SplitOutputs

MAX_GROUPS = 20  # a slice column with more distinct values keeps its most frequent ones, the rest as "other"


def groups_by_value(values: Sequence, numeric_buckets: int = 4) -> tuple[list[str], np.ndarray]:
    """Group names and each row's group: numbers with many values in quantile buckets ("3–7"), anything
    else by value (the MAX_GROUPS - 1 most frequent, then "other")."""
    numeric = all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)
                  for v in values)
    if numeric and len(set(values)) > MAX_GROUPS // 2:
        numbers = np.asarray(values, dtype=np.float64)
        cuts = np.unique(np.quantile(numbers, np.linspace(0, 1, numeric_buckets + 1)[1:-1], method="lower"))
        index = np.searchsorted(cuts, numbers, side="left")  # bucket b: (cuts[b-1], cuts[b]]
        names = []
        for b in range(len(cuts) + 1):
            inside = numbers[index == b]
            names.append(f"{_short_number(inside.min())}–{_short_number(inside.max())}" if len(inside) else "")
        return names, index
    keys = ["(missing)" if v is None else str(v) for v in values]
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    frequent = sorted(counts, key=lambda key: (-counts[key], key))
    if len(frequent) > MAX_GROUPS:
        names = sorted(frequent[:MAX_GROUPS - 1], key=_natural) + [f"other ({len(frequent) - MAX_GROUPS + 1} values)"]
    else:
        names = sorted(frequent, key=_natural)
    position = {name: i for i, name in enumerate(names)}
    return names, np.array([position.get(key, len(names) - 1) for key in keys])


def _natural(text: str) -> tuple:
    """"2" before "10", numbers before words."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def _short_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


def by_group(names: list[str], index: np.ndarray, score: Callable[[np.ndarray], dict]) -> list[dict]:
    """A row per group that has rows: its name, row count and ``score`` of the mask of its rows."""
    rows = []
    for g, name in enumerate(names):
        inside = index == g
        if inside.any():
            rows.append({"group": name, "rows": int(inside.sum()), **score(inside)})
    return rows


def input_words(outputs: SplitOutputs) -> list[int]:
    """Each row's input length in words, a pair's second text included."""
    return [_words(outputs.texts[i]) + (_words(outputs.pairs[i]) if outputs.pairs else 0)
            for i in range(len(outputs))]


def _words(text) -> int:
    return len(text) if isinstance(text, (list, tuple)) else len(str(text).split())
