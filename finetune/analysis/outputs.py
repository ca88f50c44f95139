"""What every analysis reads: one model's outputs on one split, with the inputs and gold labels, as
plain numpy arrays and lists (no torch, no model), so each task's analysis is a pure function of it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SplitOutputs:
    """A model's (run or ensemble) outputs on one split, one entry per row of the split.

    By task (``task`` is the recipe's task name):
      - ``classification``: ``gold`` int (N,) class ids; ``probabilities`` float (N, C), rows sum to 1;
        ``predicted`` int (N,) (argmax, or an ensemble vote).
      - ``multi_label``: ``gold`` int (N, C) 0/1; ``probabilities`` float (N, C) (sigmoid, independent);
        ``predicted`` int (N, C) 0/1 after ``thresholds``; ``thresholds`` float (C,).
      - ``regression``: ``gold`` float (N,); ``predicted`` float (N,); ``probabilities`` None.
      - ``token_classification``: ``gold`` and ``predicted`` are lists (one per row) of int arrays of
        word-level tag ids (one per word; words cut off by truncation are absent from both);
        ``probabilities`` a list of float (n_words, C) arrays; ``texts`` rows are word lists.
    ``labels`` are the class / label / tag names in id order (None for regression).
    """

    task: str
    split: str
    model: str
    """What produced the outputs (a run or ensemble folder), for titles."""
    texts: list
    pairs: list | None
    labels: list[str] | None
    gold: object
    predicted: object
    probabilities: object | None = None
    thresholds: np.ndarray | None = None
    columns: dict[str, list] = field(default_factory=dict)
    """The split's other columns (by name, one value per row), for slices."""
    temperature: float | None = None
    """Single-label classification: the temperature already applied to ``probabilities`` (the run's
    ``calibration.json``, as ``finetune predict`` applies it); None when none was."""

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Analysis:
    """One analysis (of one task's outputs): what ``finetune analyze`` writes and prints.

    ``summary`` is JSON-able (numbers, strings, lists, dicts) and goes to ``analysis/analysis.json``;
    ``markdown`` is a section of ``analysis/report.md`` (it may link the figures by file name);
    ``console`` is a few lines (a screen at most) for the terminal; ``figures`` are the PNGs written.
    """

    summary: dict
    markdown: str
    console: list[str]
    figures: list = field(default_factory=list)
