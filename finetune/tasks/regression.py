"""Regression: one float target per text (or pair); a single output, mean squared error."""

from __future__ import annotations

import math

import datasets
import numpy as np
import torch
from torch.nn import functional as F

from finetune import ingest
from finetune.errors import DataError
from finetune.tasks.base import Task, require_columns


class Regression(Task):
    name = "regression"
    classes = False
    problem_type = "regression"
    votes = False

    def label_names(self, recipe, raw: datasets.DatasetDict) -> None:
        """No label set; every target must be a finite number (a NaN target makes every loss NaN)."""
        column = recipe.data.columns.label
        require_columns(raw, [column])
        for split, ds in raw.items():
            for row, value in enumerate(ds[column][:]):
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    raise DataError(f"data: {ingest.where(ds, split, row)}: column '{column}' has {value!r}, "
                                    "not a number (task=regression)") from None
                if not math.isfinite(number):
                    raise DataError(f"data: {ingest.where(ds, split, row)}: column '{column}' has {value!r}; "
                                    "regression targets must be finite numbers")

    def encode_label(self, value, label_id, cfg) -> float:
        return float(value)

    def label_summary(self, values: list, cfg) -> dict:
        targets = np.array(values, dtype=float)
        return {"target": {"min": float(targets.min()), "max": float(targets.max()),
                           "mean": round(float(targets.mean()), 6), "std": round(float(targets.std()), 6)}}

    def evaluate(self, logits, gold, labels, thresholds=None) -> tuple[float, list, list]:
        predictions, gold = torch.cat(logits).squeeze(-1), torch.cat(gold)
        loss = F.mse_loss(predictions, gold.float())
        return loss.item(), predictions.tolist(), gold.tolist()

    def predict(self, logits, enc, inputs, labels, thresholds=None) -> list[dict]:
        return [{"score": float(score)} for score in logits[:, 0]]

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 0]


TASK = Regression()
