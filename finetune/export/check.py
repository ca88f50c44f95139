"""The export's check: the exported model against the run's PyTorch model on the rows of one split.

Both read the same tokenised batches; the check measures the largest absolute logit difference (over real
tokens for token classification), how often the decisions agree (the label; the set of labels above their
thresholds; each word's tag; regression has scores, no decisions) and each model's score on the gold labels
(accuracy, exact match, word accuracy; mean squared error for regression).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from finetune.export.formats import Logits
from finetune.export.served import ExportedModel
from finetune.progress import bar
from finetune.tasks import TASKS

if TYPE_CHECKING:  # importing finetune.analysis would load every analysis for `finetune predict`
    from finetune.analysis.outputs import SplitOutputs

FP32_TOLERANCE = 1e-3
"""Largest absolute logit difference a float32 export may show (float32 kernels reorder sums: ~1e-6)."""
METRICS = {"classification": "accuracy", "multi_label_classification": "exact_match",
           "token_classification": "word_accuracy", "regression": "mse"}


@dataclass
class Comparison:
    rows: int
    max_abs_diff: float
    agreeing: int | None
    """Decisions that are the same in both (rows; words for token classification); None for regression."""
    decisions: int | None
    unit: str
    metric: str
    reference_score: float
    exported_score: float

    @property
    def all_agree(self) -> bool:
        return self.agreeing == self.decisions

    def passes(self, tolerance: float = FP32_TOLERANCE) -> bool:
        return self.all_agree and self.max_abs_diff <= tolerance

    def agreement_text(self) -> str:
        if self.decisions is None:
            return "no decisions to compare (regression)"
        share = self.agreeing / self.decisions if self.decisions else 1.0
        return f"predictions agree on {self.agreeing}/{self.decisions} {self.unit} ({share:.2%})"

    def to_dict(self) -> dict:
        return {**asdict(self), "agreement": None if self.decisions is None else
                (self.agreeing / self.decisions if self.decisions else 1.0)}


def _decisions(task_name: str, result: dict) -> list:
    """What a prediction decides, one entry per decision (a row; a word for token classification)."""
    if task_name == "token_classification":
        return list(result["tags"])
    if task_name == "multi_label_classification":
        return [tuple(sorted(result["labels"]))]
    return [result["label"]]


def _gold(task_name: str, gold, labels: list[str] | None) -> list:
    if task_name == "token_classification":
        return [labels[int(i)] for i in gold]
    if task_name == "multi_label_classification":
        return [tuple(sorted(labels[i] for i, on in enumerate(gold) if on))]
    return [labels[int(gold)]]


def compare(reference: Logits, exported: Logits, served: ExportedModel, rows: SplitOutputs, batch_size: int = 64,
            limit: int | None = None, desc: str = "export check") -> Comparison:
    """``reference`` and ``exported`` logits on the first ``limit`` rows of ``rows`` (all when None), read
    through ``served``'s tokenizer, labels and thresholds."""
    task = TASKS[served.meta["task"]]
    count = len(rows) if limit is None else min(limit, len(rows))
    max_diff, agreeing, decisions = 0.0, 0, 0
    scores: dict[str, list] = {"reference": [], "exported": []}
    for start in bar(range(0, count, batch_size), desc=desc):
        end = min(start + batch_size, count)
        chunk = rows.texts[start:end]
        enc = served.encode(chunk, rows.pairs[start:end] if rows.pairs else None)
        arrays = {name: enc[name] for name in served.meta["inputs"]}
        expected, got = reference(arrays), exported(arrays)
        # token classification: padding positions are no one's output
        real = enc["attention_mask"].astype(bool) if task.words else np.ones(expected.shape[0], dtype=bool)
        max_diff = max(max_diff, float(np.abs(expected - got)[real].max()))
        predicted = {name: task.predict(torch.from_numpy(logits).float(), enc, chunk, served.labels, served.thresholds)
                     for name, logits in (("reference", expected), ("exported", got))}
        for row, (a, b) in enumerate(zip(predicted["reference"], predicted["exported"])):
            gold = rows.gold[start + row]
            if not task.classes:
                scores["reference"].append((a["score"] - float(gold)) ** 2)
                scores["exported"].append((b["score"] - float(gold)) ** 2)
                continue
            ours, theirs = _decisions(task.name, a), _decisions(task.name, b)
            truth = _gold(task.name, gold, served.labels)[:len(ours)]  # words cut off by max_length: no tag
            agreeing += sum(x == y for x, y in zip(ours, theirs))
            decisions += len(ours)
            scores["reference"] += [x == t for x, t in zip(ours, truth)]
            scores["exported"] += [y == t for y, t in zip(theirs, truth)]
    return Comparison(rows=count, max_abs_diff=max_diff, agreeing=agreeing if task.classes else None,
                      decisions=decisions if task.classes else None,
                      unit="words" if task.words else "rows", metric=METRICS[task.name],
                      reference_score=float(np.mean(scores["reference"])) if scores["reference"] else float("nan"),
                      exported_score=float(np.mean(scores["exported"])) if scores["exported"] else float("nan"))
