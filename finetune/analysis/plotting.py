"""Figure helpers of the analyses: headless figures saved atomically, labels cut to fit, per-category score bars.

Figures are built on ``matplotlib.figure.Figure`` rather than pyplot: no global figure registry to leak
into (nothing to close) and no GUI backend, so it works headless and alongside other pyplot users.
Text and tables are in ``finetune.analysis.text``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from finetune.analysis.text import shorten

LABEL_WIDTH = 24
"""Category names on axes and legends are cut to this many characters."""
MAX_BARS = 60
"""A bar chart shows at most this many categories (the most frequent), so it stays legible."""


def new_figure(width: float, height: float, layout: str | None = "constrained"):
    """A figure of ``width`` x ``height`` inches, independent of pyplot (and of its backend); ``layout``
    None for axes placed by hand."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # nothing drawn on screen, even if pyplot gets imported later
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout=layout)


def save(fig, path: Path, dpi: float | None = None, tight: bool = False) -> Path:
    """Write ``fig`` as PNG to ``path`` through a temporary file, so a reader never sees half a PNG, then free
    it; ``dpi`` None keeps the figure's, ``tight`` trims the margins (one more layout pass)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(temporary, format="png", dpi=dpi or "figure", bbox_inches="tight" if tight else None)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
        fig.clear()
    return path


def short(label: object, width: int = LABEL_WIDTH) -> str:
    """``label`` on one line, cut to ``width`` characters (an ellipsis marks the cut)."""
    return shorten(label, width)


def title_of(model: str, split: str, what: str) -> str:
    """A figure title naming what is shown, the model (its folder's name) and the split."""
    return f"{what}\n{short(Path(str(model)).name or model, 48)} · {split}"


def score_bars(names: Sequence[str], f1: Sequence[float], precision: Sequence[float],
               recall: Sequence[float], support: Sequence[int], title: str, path: Path) -> Path:
    """Horizontal F1 bars per category (worst at the top), annotated with precision, recall and support.

    Shows the ``MAX_BARS`` most frequent categories when there are more.
    """
    order = sorted(range(len(names)), key=lambda i: -support[i])[:MAX_BARS]
    order.sort(key=lambda i: (f1[i], -support[i]), reverse=True)  # barh draws the first at the bottom
    if len(order) < len(names):
        title += f" ({len(order)} most frequent of {len(names)})"
    fig = new_figure(8.0, min(2.0 + 0.34 * len(order), 26.0))
    ax = fig.add_subplot()
    positions = range(len(order))
    ax.barh(positions, [f1[i] for i in order], color="#4c72b0", height=0.7)
    ax.set_yticks(list(positions), [short(names[i]) for i in order])
    for y, i in enumerate(order):
        note = f"{f1[i]:.2f}  P {precision[i]:.2f} R {recall[i]:.2f}  n={support[i]:,}"
        inside = f1[i] > 0.45  # else the note goes right of the short bar, in black
        ax.text(0.01 if inside else f1[i] + 0.01, y, note, va="center", ha="left", fontsize=8,
                color="white" if inside else "black")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, len(order) - 0.4)
    ax.set_xlabel("F1")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return save(fig, path)
