"""A run's side of distillation: the training rows with the teacher's targets beside them (plus unlabeled
rows the teacher labels), a collator that batches the targets, and the loss the loop calls.

``finetune.run.Run`` builds a ``Distillation`` when ``distill.teacher`` is set; validation, test and
everything after training are the same as for any run (gold labels only).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from finetune.config import RecipeConfig, RecipeError
from finetune.distill import teacher as teacher_lib
from finetune.distill.loss import LOSSES
from finetune.errors import DataError
from finetune.tasks import TASKS

log = logging.getLogger("finetune")

TARGETS, GOLD = "teacher_targets", "gold"


class RowsWithTargets(Dataset):
    """The tokenised training rows, then the unlabeled ones, each with its teacher targets and whether it
    has a gold label."""

    def __init__(self, labelled, unlabelled, targets: list):
        self.labelled, self.unlabelled, self.targets = labelled, unlabelled, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict:
        n = len(self.labelled)
        row = dict(self.labelled[index]) if index < n else dict(self.unlabelled[index - n])
        return {**row, TARGETS: self.targets[index], GOLD: float(index < n)}


class Distillation:
    """What a run needs to train a student: ``train_set`` (with ``lengths`` for the length-grouped sampler),
    ``collator(base)`` and ``loss(model, batch)``; ``summary`` goes into metrics.json."""

    def __init__(self, recipe: RecipeConfig, raw_train, tokenised_train, tokenizer, labels: list[str] | None):
        cfg, task = recipe.distill, TASKS[recipe.task]
        self.task, self.temperature, self.alpha = recipe.task, cfg.temperature, cfg.alpha
        started = time.perf_counter()
        teacher = teacher_lib.load_teacher(cfg.teacher)
        teacher_lib.check_fits(teacher, recipe.task, labels)
        if len(raw_train) != len(tokenised_train):
            raise RuntimeError("distillation: tokenised training rows no longer match the raw ones")
        if task.words:
            if cfg.unlabeled:
                raise RecipeError("distill.unlabeled: extra unlabeled text is for sequence-level tasks; token "
                                  "classification distils on its training sentences only")
            key = ["tokens", teacher_lib.texts_key(tokenised_train["input_ids"], None)]
            targets, from_cache = teacher_lib.cached(teacher, key, lambda: teacher_lib.token_targets(
                teacher, tokenised_train, tokenizer, labels), f"{len(tokenised_train)} training rows")
            unlabelled, extra = None, []
        else:
            cols = recipe.data.columns
            texts, pairs = raw_train[cols.text], raw_train[cols.text_pair] if cols.text_pair else None
            targets, from_cache = teacher_lib.cached(
                teacher, teacher_lib.texts_key(texts, pairs),
                lambda: teacher_lib.sequence_targets(teacher, texts, pairs, labels),
                f"{len(texts)} training rows")
            unlabelled, extra = (self._unlabelled(recipe, teacher, tokenizer, labels) if cfg.unlabeled
                                 else (None, []))
        targets = list(targets) + list(extra)
        self.train_set = RowsWithTargets(tokenised_train, unlabelled, targets)
        self.lengths = [len(ids) for ids in tokenised_train["input_ids"]] + (
            [len(ids) for ids in unlabelled["input_ids"]] if unlabelled is not None else [])
        self.summary = {"teacher": str(teacher.path), "teacher_kind": teacher.kind,
                        "teacher_test": _teacher_test(teacher.path), "temperature": self.temperature,
                        "alpha": self.alpha, "labelled_rows": len(tokenised_train),
                        "unlabeled_rows": len(extra),
                        "teacher_agreement_train": _agreement(recipe.task, targets[:len(tokenised_train)],
                                                              tokenised_train["labels"]),
                        "teacher_targets": "cache" if from_cache else "computed",
                        "teacher_seconds": round(time.perf_counter() - started, 2)}

    def describe(self) -> str:
        """One line for the run's log."""
        s = self.summary
        return (f"distillation: teacher {s['teacher']} ({s['teacher_kind']}), temperature {s['temperature']:g}, "
                f"alpha {s['alpha']:g}; {s['labelled_rows']} labelled"
                f"{' + ' + str(s['unlabeled_rows']) + ' unlabeled' if s['unlabeled_rows'] else ''} training rows; "
                f"targets {'read from the cache' if s['teacher_targets'] == 'cache' else 'computed'} in "
                f"{s['teacher_seconds']:.1f} s; the teacher agrees with the gold labels on "
                f"{_percent(s['teacher_agreement_train'])} of them")

    def _unlabelled(self, recipe: RecipeConfig, teacher, tokenizer, labels) -> tuple:
        """distill.unlabeled: the inputs, tokenised like the training rows, with the teacher's targets and
        labels (which only fill the batch: unlabeled rows have no hard loss)."""
        import datasets

        texts, pairs = read_unlabeled(recipe)
        targets, _ = teacher_lib.cached(teacher, teacher_lib.texts_key(texts, pairs),
                                        lambda: teacher_lib.sequence_targets(teacher, texts, pairs, labels),
                                        f"{len(texts)} unlabeled rows")
        enc = dict(tokenizer(texts, pairs, truncation=True, max_length=recipe.data.max_length))
        if recipe.task == "classification":
            enc["labels"] = targets.argmax(-1).tolist()
        elif recipe.task == "regression":
            enc["labels"] = targets.tolist()
        else:
            enc["labels"] = (targets >= 0.5).float().tolist()
        return datasets.Dataset.from_dict(enc), list(targets)

    def collator(self, base):
        """``base`` (the task's collator) on the inputs and labels; targets stacked (padded per token)."""
        per_token = TASKS[self.task].words

        def collate(rows: list[dict]) -> dict:
            targets = [torch.as_tensor(row.pop(TARGETS), dtype=torch.float32) for row in rows]
            gold = torch.tensor([row.pop(GOLD) for row in rows])
            batch = base(rows)
            if per_token:
                width = batch["input_ids"].shape[1]
                padded = torch.zeros(len(rows), width, targets[0].shape[-1])
                for i, t in enumerate(targets):
                    padded[i, :len(t)] = t[:width]
                batch[TARGETS] = padded
            else:
                batch[TARGETS] = torch.stack(targets)
            batch[GOLD] = gold
            return batch

        return collate

    def loss(self, model, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", TARGETS, GOLD)}
        logits = model(**inputs).logits.float()
        return LOSSES[self.task](logits, batch["labels"], batch[TARGETS].to(logits), batch[GOLD].to(logits),
                                 self.temperature, self.alpha)


def read_unlabeled(recipe: RecipeConfig) -> tuple[list[str], list[str] | None]:
    """The distill.unlabeled file's inputs (a seeded sample of distill.max_unlabeled of them).

    Raises:
        DataError: missing or empty file, a .txt file for text pairs, or a missing input column (named).
    """
    from finetune.data import read_lines, read_table

    cfg, cols = recipe.distill, recipe.data.columns
    path = Path(cfg.unlabeled).expanduser()
    if not path.is_file():
        raise DataError(f"distill.unlabeled: {path} does not exist (expected a .txt file, one text per line, or a "
                        "csv/tsv/json/jsonl file with the recipe's input columns)")
    needed = TASKS[recipe.task].input_columns(cols)
    if path.suffix == ".txt":
        if len(needed) > 1:
            raise DataError(f"distill.unlabeled: this recipe reads text pairs; give a csv/tsv/json/jsonl file with "
                            f"columns {needed[0]!r} and {needed[1]!r}")
        texts, pairs = read_lines(path), None
    else:
        table = read_table(path, other_formats=(".txt",))
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise DataError(f"distill.unlabeled: {path} has no column {missing[0]!r} (the recipe's data.columns); "
                            f"its columns are {table.column_names}")
        texts, pairs = table[needed[0]], table[needed[1]] if len(needed) > 1 else None
    if not texts:
        raise DataError(f"distill.unlabeled: {path} holds no inputs")
    if cfg.max_unlabeled is not None and len(texts) > cfg.max_unlabeled:
        rows = sorted(random.Random(recipe.data.subsample_seed).sample(range(len(texts)), cfg.max_unlabeled))
        texts, pairs = [texts[i] for i in rows], [pairs[i] for i in rows] if pairs else None
    return [str(t) for t in texts], [str(p) for p in pairs] if pairs else None


def _teacher_test(path: Path) -> dict | None:
    """The teacher's own test scores (a run's metrics.json, an ensemble's report), when it has them."""
    import json

    for name, keys in (("metrics.json", ("test",)), ("ensemble_report.json", ("ensemble", "test"))):
        file = path / name
        if file.is_file():
            try:
                node = json.loads(file.read_text())
                for key in keys:
                    node = node[key]
                return node if isinstance(node, dict) else None
            except (ValueError, KeyError, TypeError):
                return None
    return None


def _agreement(task: str, targets: list, gold: list) -> float | None:
    """How often the teacher's prediction is the gold label on the training rows (classes only)."""
    if task == "classification":
        predicted = torch.stack(targets).argmax(-1)
        return float((predicted == torch.tensor(gold)).float().mean())
    if task == "multi_label_classification":
        return float(((torch.stack(targets) >= 0.5).float() == torch.tensor(gold)).all(-1).float().mean())
    if task == "token_classification":
        hits = total = 0
        for probs, labels in zip(targets, gold):
            labels = torch.tensor(labels)
            mask = labels != -100
            hits += int((probs.argmax(-1)[mask] == labels[mask]).sum())
            total += int(mask.sum())
        return hits / max(total, 1)
    return None


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
