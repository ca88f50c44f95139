"""Text helpers of the analyses: numbers as table cells, aligned markdown tables, inputs cut to one line, and
summaries made JSON-able."""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.analysis.outputs import SplitOutputs

_NUMERIC = re.compile(r"^(–|[-+]?[\d,]*\.?\d+(e[-+]?\d+)?%?)$")
"""A table cell that reads as a number (or the dash of a missing one): such columns are right-aligned."""


def number(value: object, digits: int = 3) -> str:
    """A table cell: ints with thousands separators, floats rounded, None/NaN as a dash."""
    if value is None or (isinstance(value, numbers.Real) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    return f"{float(value):.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], digits: int = 3) -> str:
    """A markdown table, columns padded to one width; numeric columns right-aligned (blank cells aside);
    cells with | or newlines are escaped."""
    cells = [[cell if isinstance(cell, str) else number(cell, digits) for cell in row] for row in rows]
    cells = [[cell.replace("|", "\\|").replace("\n", " ") for cell in row] for row in cells]
    filled = [[row[c] for row in cells if row[c]] for c in range(len(headers))]
    numeric = [bool(column) and all(_NUMERIC.match(cell) for cell in column) for column in filled]
    widths = [max([len(h), 3] + [len(row[c]) for row in cells]) for c, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if right else "-" * (w + 2) for w, right in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), rule] + [line(row) for row in cells])


def shorten(text: object, width: int = 120) -> str:
    """One line of at most ``width`` characters: a text, or a word list joined by spaces; the cut is marked
    with …"""
    if isinstance(text, (list, tuple)):
        text = " ".join(map(str, text))
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def input_text(outputs: SplitOutputs, row: int, width: int = 120) -> str:
    """A row's input for a table; a pair as 'first ‖ second', each part shortened to its half."""
    if outputs.pairs is None:
        return shorten(outputs.texts[row], width)
    half = max(20, (width - 3) // 2)
    return f"{shorten(outputs.texts[row], half)} ‖ {shorten(outputs.pairs[row], half)}"


def clean(value: object, digits: int | None = 8) -> object:
    """``value`` made JSON-able, recursively: numpy scalars and arrays to Python, paths to text, NaN/inf to
    None, floats to ``digits`` significant digits (None: kept whole)."""
    if isinstance(value, dict):
        return {str(k): clean(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v, digits) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return clean(value.tolist(), digits)
    if isinstance(value, numbers.Integral):  # bool included
        return value
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            return None
        return float(value) if digits is None else float(f"{float(value):.{digits}g}")
    return value
