"""Multi-label classification: each text (or pair) has a set of labels, possibly empty.

The label column holds a list in JSON/JSONL/parquet (``["PER", "LOC"]``, ``[]``) or, in csv/tsv, text
split at ``data.label_separator`` (``"PER|LOC"``; an empty cell: no label). One sigmoid per label, trained
with binary cross-entropy (``config.problem_type = "multi_label_classification"``, so the
text-classification pipeline gives sigmoid scores too). A label applies when its probability is above
its threshold: ``eval.threshold`` for every label, or one per label tuned on validation
(``tune_thresholds``), kept in the model's ``config.thresholds``.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import torch
from torch.nn import functional as F

from finetune import ingest
from finetune.errors import DataError
from finetune.ingest import label_text
from finetune.tasks.base import Task, check_known, natural_key, require_columns


class MultiLabelClassification(Task):
    name = "multi_label_classification"
    problem_type = "multi_label_classification"
    pipeline_options = ", top_k=None"  # every label's score, not only the best one
    card_note = ("Its scores are one sigmoid per label (several labels may apply, or none); a label applies when "
                 "its score is above its threshold, listed in label-id order under `thresholds` in the model's "
                 "`config.json` (`finetune predict` applies them).")
    ensembles = False  # averaging sigmoid probabilities and thresholds across members is not done yet
    votes = False

    def label_names(self, recipe, raw: datasets.DatasetDict) -> list[str]:
        """The label names, as given or inferred (sorted) from train; every row's labels checked: a list
        (or separated text in csv/tsv), no empty name, each name in the set and seen in training."""
        column, separator = recipe.data.columns.label, _separator(recipe.data)
        require_columns(raw, [column])
        distinct: dict[str, dict[str, str]] = {}
        for split, ds in raw.items():
            delimited = _delimited(ds)
            seen = distinct[split] = {}
            for row, value in enumerate(ds[column][:]):
                names = _parse(value, separator, delimited)
                if names is None:
                    raise DataError(f"{ingest.where(ds, split, row)}: column {column!r} holds {value!r:.40}; "
                                    "multi_label_classification expects a list of labels, e.g. [\"PER\", \"LOC\"] "
                                    + (f"or labels separated by {separator!r}" if delimited else "(possibly empty)"))
                if "" in names:
                    raise DataError(f"{ingest.where(ds, split, row)}: column {column!r} holds {value!r:.40}, which "
                                    f"has an empty label name (labels are separated by {separator!r})")
                for name in names:
                    seen.setdefault(name, name)
        given = recipe.data.labels
        trained = sorted(distinct.get("train", {}), key=natural_key)
        names = given or trained
        if len(names) < 2:
            raise DataError(f"data: found {len(names)} label(s) {names} in {ingest.source_of(raw['train'], 'train')}; "
                            "multi_label_classification needs at least 2 (for one label use task: classification)")

        def first_at(split: str, name: str) -> str:
            ds, delimited = raw[split], _delimited(raw[split])
            row = next(i for i, v in enumerate(ds[column][:]) if name in _parse(v, separator, delimited))
            return ingest.where(ds, split, row)

        check_known(raw, column, distinct, names, given is not None, first_at)
        return names

    def encode_label(self, value, label_id: dict[str, int], cfg) -> list[float]:
        """Multi-hot: 1.0 for each of the row's labels (BCE wants float targets)."""
        hot = [0.0] * len(label_id)
        for name in _parse(value, _separator(cfg), True):
            hot[label_id[name]] = 1.0
        return hot

    def label_summary(self, values: list, cfg) -> dict:
        """Rows holding each label, and how many rows have 0, 1, 2, ... labels."""
        sets = [_parse(v, _separator(cfg), True) or [] for v in values]
        counts: dict[str, int] = {}
        sizes: dict[str, int] = {}
        for names in sets:
            for name in set(names):
                counts[name] = counts.get(name, 0) + 1
            sizes[str(len(set(names)))] = sizes.get(str(len(set(names))), 0) + 1
        return {"labels": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
                "labels_per_row": dict(sorted(sizes.items(), key=lambda kv: int(kv[0])))}

    # --- evaluation and prediction -------------------------------------------------------------

    def thresholds(self, config, recipe, labels: list[str] | None) -> torch.Tensor:
        """The model's saved per-label thresholds (``config.thresholds``), else ``eval.threshold`` for each."""
        saved = getattr(config, "thresholds", None)
        if saved is not None and len(saved) == len(labels):
            return torch.tensor(saved, dtype=torch.float32)
        return torch.full((len(labels),), recipe.eval.threshold)

    def evaluate(self, logits, gold, labels, thresholds=None) -> tuple[float, list, list]:
        logits, gold = torch.cat(logits), torch.cat(gold).float()
        loss = F.binary_cross_entropy_with_logits(logits, gold)  # mean over rows and labels, as the model's
        predicted = logits.sigmoid() > _or_default(thresholds, logits)
        return loss.item(), predicted.long().tolist(), gold.long().tolist()

    def predict(self, logits, enc, inputs, labels, thresholds=None) -> list[dict]:
        """The labels above their thresholds (most probable first) and every label's probability."""
        probs = logits.sigmoid()
        above = probs > _or_default(thresholds, logits)
        results = []
        for row, chosen in zip(probs, above):
            order = sorted(range(len(labels)), key=lambda i: -float(row[i]))
            results.append({"labels": [labels[i] for i in order if chosen[i]],
                            "probabilities": {labels[i]: round(float(row[i]), 6) for i in order}})
        return results

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()


def tune_thresholds(probs: torch.Tensor, gold: torch.Tensor, default: float) -> list[float]:
    """Per label, the threshold that maximises that label's F1 on (probs, gold), both (N, C).

    Predicting "above t" for each cut between distinct probabilities; a label whose F1 can't beat the one
    at ``default`` (e.g. no positive row) keeps ``default``; among equal F1s the highest threshold wins.
    The threshold is the midpoint between the last probability kept and the next one.
    """
    chosen = []
    for column, truth in zip(probs.double().T, gold.bool().T):
        values, order = column.sort(descending=True)
        hits = truth[order].double().cumsum(0)  # true positives when the first k+1 rows are predicted
        last = torch.ones_like(values, dtype=torch.bool)
        last[:-1] = values[:-1] > values[1:]  # cut only between different probabilities
        f1 = torch.where(last, 2 * hits / (torch.arange(1, len(values) + 1) + truth.sum()), -1.0)
        at_default = _f1(column > default, truth)
        best = int(f1.argmax())
        if f1[best] <= at_default:
            chosen.append(default)
            continue
        after = float(values[best + 1]) if best + 1 < len(values) else 0.0
        chosen.append((float(values[best]) + after) / 2)
    return chosen


def _f1(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    tp, wrong = (predicted & truth).sum().item(), (predicted ^ truth).sum().item()
    return 2 * tp / (2 * tp + wrong) if tp else 0.0


def _or_default(thresholds: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    return torch.full(logits.shape[-1:], 0.5) if thresholds is None else thresholds.to(logits.device)


def _separator(cfg) -> str:
    return cfg.label_separator or "|"


def _delimited(ds: datasets.Dataset) -> bool:
    """Read from a csv/tsv file: its label cells are text, split at the separator."""
    origin = ingest.origin_of(ds)
    if origin is None or not origin.is_file:
        return False
    return Path(origin.row_sources[0] if origin.row_sources else origin.source).suffix in (".csv", ".tsv")


def _parse(value, separator: str, delimited: bool) -> list[str] | None:
    """A row's label names, or None when the value can't hold labels (a text outside csv/tsv, a number, ...)."""
    if isinstance(value, list):
        if not all(isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in value):
            return None  # [null], [["PER"]], [true]: not label names
        return [label_text(v).strip() for v in value]
    if delimited and isinstance(value, str):
        return [name.strip() for name in value.split(separator)] if value.strip() else []
    if delimited and isinstance(value, int) and not isinstance(value, bool):  # a cell "3", read as a number
        return [label_text(value)]
    return None


TASK = MultiLabelClassification()
