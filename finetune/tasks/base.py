"""What every task shares: the ``Task`` base with its defaults (a single-label text classifier), and the
checks of class labels that classification and token classification both use.

A task owns what differs between tasks: the columns it reads, its labels and their checks, how labels
become tensors (encode, collate, gather across processes), how logits become a loss, metrics inputs and
predictions, and the facts other code asks for (model class, Auto class, pipeline, peft task type).
The loss itself is computed twice, on purpose: by the model (``finetune.modeling``, which is copied into
run folders and picks it by ``config.problem_type``) and by ``evaluate`` here, on gathered logits; a test
keeps the two equal.
"""

from __future__ import annotations

import math
import re

import datasets
import torch
from torch.nn import functional as F
from transformers import DataCollatorWithPadding

from finetune import ingest
from finetune.errors import DataError
from finetune.ingest import label_text
from finetune.modeling import FinetuneForSequenceClassification


class Task:
    """A single-label text classifier; subclasses change what differs."""

    name = ""
    words = False
    """The input is a list of words with one label per word (token classification)."""
    classes = True
    """False: one float target per row and no label set (regression)."""
    problem_type: str | None = None
    """``config.problem_type``: the model's loss and the text-classification pipeline's scores follow it."""
    model_class: type = FinetuneForSequenceClassification
    auto_class_name = "AutoModelForSequenceClassification"
    pipeline_task = "text-classification"
    pipeline_options = ""
    """Arguments the model card's ``pipeline(...)`` line adds (after ``model=``)."""
    card_note = ""
    """What the model card adds about reading the model's output."""
    peft_task_type = "SEQ_CLS"
    ensembles = True
    """Runs of this task can be combined by ``finetune ensemble``."""
    votes = True
    """``--combine vote`` means something (one label per row)."""

    # --- data ---------------------------------------------------------------------------------

    def input_columns(self, cols) -> list[str]:
        return [cols.text] + ([cols.text_pair] if cols.text_pair else [])

    def label_column(self, cols) -> str:
        return cols.label

    def label_names(self, recipe, raw: datasets.DatasetDict) -> list[str] | None:
        """The label set in id order, after checking every split's labels (see ``class_label_names``)."""
        column = self.label_column(recipe.data.columns)
        require_columns(raw, [column])
        for split, ds in raw.items():
            row = next((i for i, v in enumerate(ds[column][:]) if isinstance(v, (list, dict))), None)
            if row is not None:
                raise DataError(f"{ingest.where(ds, split, row)}: column {column!r} holds {ds[row][column]!r:.40}, "
                                f"not one label (for several labels per row set task: multi_label_classification)")
        return class_label_names(recipe, raw, column, per_word=False)

    def encode(self, batch: dict, tokenizer, cfg, label_id: dict[str, int] | None) -> dict:
        """Tokenise a batch of rows (truncation only: padding happens per batch) and attach ``labels``."""
        cols = cfg.columns
        pair = batch[cols.text_pair] if cols.text_pair else None
        enc = tokenizer(batch[cols.text], pair, truncation=True, max_length=cfg.max_length)
        enc["labels"] = [self.encode_label(value, label_id, cfg) for value in batch[cols.label]]
        return enc

    def encode_label(self, value, label_id: dict[str, int] | None, cfg):
        return label_id[label_text(value)]

    def collator(self, tokenizer, multiple_of: int | None):
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple_of)

    def label_summary(self, values: list, cfg) -> dict:
        """What ``data_report.json`` says of a split's labels: each label's count."""
        return {"labels": _counts(values)}

    # --- evaluation and prediction -------------------------------------------------------------

    def gather(self, accelerator, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch's logits and labels from every process, without the duplicates of an uneven last batch."""
        return accelerator.gather_for_metrics((logits, labels))

    def thresholds(self, config, recipe, labels: list[str] | None) -> torch.Tensor | None:
        """Per-label decision thresholds (multi-label only)."""
        return None

    def evaluate(self, logits: list[torch.Tensor], gold: list[torch.Tensor], labels: list[str] | None,
                 thresholds: torch.Tensor | None = None) -> tuple[float, list, list]:
        """(loss, predictions, references) over a split's gathered batches; the loss equals the model's."""
        logits, gold = torch.cat(logits), torch.cat(gold)
        loss = F.cross_entropy(logits, gold)
        return loss.item(), logits.argmax(-1).tolist(), gold.tolist()

    def predict(self, logits: torch.Tensor, enc, inputs: list, labels: list[str] | None,
                thresholds: torch.Tensor | None = None) -> list[dict]:
        """One dict per input: the most probable ``label`` and every label's ``probabilities``."""
        results = []
        for probs in logits.softmax(-1):
            results.append({"label": labels[int(probs.argmax())],
                            "probabilities": {name: round(float(p), 6) for name, p in zip(labels, probs)}})
        return results

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """What an ensemble averages over members: probabilities (N, C)."""
        return logits.softmax(-1)


def require_columns(raw: datasets.DatasetDict, columns: list[str]) -> None:
    for split, ds in raw.items():
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise DataError(
                f"data.columns: {ingest.source_of(ds, split)} has no column {missing[0]!r}; its columns are "
                f"{ds.column_names} (map yours with data.columns.text / text_pair / label / tokens / tags)"
            )


def natural_key(value: str):
    return (0, int(value), "") if re.fullmatch(r"-?\d+", value) else (1, 0, value)


def _counts(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[label_text(value)] = counts.get(label_text(value), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def class_label_names(recipe, raw: datasets.DatasetDict, column: str, per_word: bool) -> list[str]:
    """The label set, in id order: as given, or inferred (sorted) from the training split.

    Checks name the file and line: a class label must not be missing (NaN) or a fractional number (that is
    a regression target); the training split needs two classes; every label of every split must be in the
    set and seen in training. ``per_word``: each row holds a list of labels (token classification).
    """
    given = recipe.data.labels
    distinct = {split: _distinct(ds[column][:], per_word) for split, ds in raw.items()}

    def first_at(split: str, value) -> str:
        return ingest.where(raw[split], split, _first_row(raw[split], column, value, per_word))

    for split, values in distinct.items():
        not_finite = [v for v in values.values() if isinstance(v, float) and not math.isfinite(v)]
        if not_finite:  # NaN in a JSON/parquet label column is a missing label, not a class named 'nan'
            raise DataError(f"{first_at(split, not_finite[0])}: label {not_finite[0]} in column {column!r} is "
                            "missing; give every row a label (or drop such rows with data.on_missing_label: drop)")
        fractional = [v for v in values.values() if _fractional(v) and not (given and label_text(v) in given)]
        if fractional:
            raise DataError(f"{first_at(split, fractional[0])}: label {label_text(fractional[0])} in column "
                            f"{column!r} is not a whole number; classification needs class names or integer ids "
                            "(for a numeric target set task: regression)")
    trained = sorted(distinct.get("train", {}), key=natural_key)
    names = given or trained
    if len(names) < 2:
        raise DataError(f"data: found {len(names)} label(s) {names} in {ingest.source_of(raw['train'], 'train')}; "
                        "classification needs at least 2")
    if "train" in raw and len(trained) < 2:
        raise DataError(f"data: {ingest.source_of(raw['train'], 'train')} has only one class {trained} in column "
                        f"{column!r}; classification needs at least 2 in the training split")
    check_known(raw, column, distinct, names, given is not None, first_at)
    return names


def check_known(raw: datasets.DatasetDict, column: str, distinct: dict[str, dict[str, object]], names: list[str],
                given: bool, first_at) -> None:
    """Every label of every split is in the label set, and seen in training (a class the model never saw
    can't be predicted: its scores would mislead). ``distinct``: per split, label name -> a raw value
    that ``first_at(split, value)`` finds the first row of."""
    known = set(names)
    for split, values in distinct.items():
        unknown = sorted(set(values) - known, key=natural_key)
        if unknown:
            raise DataError(
                f"data: split '{split}' column '{column}' has label {unknown[0]!r} not in the label set {names}"
                + (" (data.labels)" if given else " (inferred from the training split)")
                + f"; first at {first_at(split, values[unknown[0]])}")
    if "train" in raw:
        for split, values in distinct.items():
            unseen = sorted(set(values) - set(distinct["train"]), key=natural_key)
            if unseen:
                raise DataError(f"{first_at(split, values[unseen[0]])}: label {unseen[0]!r} never appears in the "
                                f"training split {ingest.source_of(raw['train'], 'train')}; the model cannot learn "
                                "it (add training rows with it, or remove it from this split)")


def _distinct(values: list, per_word: bool) -> dict[str, object]:
    """Each label's class name -> its first raw value."""
    seen: dict[str, object] = {}
    for value in (t for seq in values for t in seq) if per_word else values:
        seen.setdefault(label_text(value), value)
    return seen


def _fractional(value) -> bool:
    """A number with a fractional part (0.35 or "0.35"): a regression target, not a class."""
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d*\.\d+([eE][-+]?\d+)?\s*", value):
        value = float(value)
    return isinstance(value, float) and math.isfinite(value) and not value.is_integer()


def _first_row(ds: datasets.Dataset, column: str, value, per_word: bool) -> int:
    values, name = ds[column][:], label_text(value)  # by class name: NaN != NaN
    return next(row for row, v in enumerate(values)
                if (name in map(label_text, v) if per_word else label_text(v) == name))
