"""The training loss when a recipe asks for more than the model's own: label smoothing and class weights.

Only training uses it. Validation and test losses stay the model's plain ones, so runs with and without these
keys compare on the same numbers. ``balanced`` weights follow scikit-learn's convention: a class with n_c of
the N training rows weighs N / (K n_c), so every class's rows add up to the same share of the loss. For
multi-label tasks each label's positives weigh negatives / positives (``pos_weight``), the usual remedy for
labels that are rarely on.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from finetune.config import RecipeConfig

SMOOTHED_TASKS = ("classification", "token_classification", "multi_label_classification")
"""Tasks with class targets; regression has nothing to smooth or weigh (recipe_checks refuses the keys)."""


def wanted(recipe: RecipeConfig) -> bool:
    cfg = recipe.train
    return recipe.task in SMOOTHED_TASKS and (cfg.label_smoothing > 0 or cfg.class_weights != "none")


class Objective:
    """``loss(model, batch)``: the training loss with ``train.label_smoothing`` and ``train.class_weights``."""

    def __init__(self, recipe: RecipeConfig, train_labels: list, num_labels: int):
        self.task, self.smoothing = recipe.task, recipe.train.label_smoothing
        self.weights = balanced_weights(recipe.task, train_labels, num_labels) \
            if recipe.train.class_weights == "balanced" else None

    def loss(self, model, batch: dict) -> torch.Tensor:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        labels = batch["labels"]
        if self.weights is not None and self.weights.device != logits.device:
            self.weights = self.weights.to(logits.device)  # once, not every step
        weights = self.weights
        if self.task == "multi_label_classification":
            targets = labels.float() * (1 - self.smoothing) + self.smoothing / 2  # toward 0.5, per label
            return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weights)
        # token classification: positions labelled -100 (later sub-words, special tokens) take no part
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), weight=weights, ignore_index=-100,
                               label_smoothing=self.smoothing)

    def describe(self) -> str:
        parts = [f"label smoothing {self.smoothing:g}"] if self.smoothing else []
        if self.weights is not None:
            kind = "positive weights" if self.task == "multi_label_classification" else "class weights"
            shown = ", ".join(f"{w:.2f}" for w in self.weights.tolist()[:12])
            parts.append(f"balanced {kind} [{shown}{', ...' if len(self.weights) > 12 else ''}]")
        return "training loss: " + "; ".join(parts)


def balanced_weights(task: str, train_labels: list, num_labels: int) -> torch.Tensor:
    """Per-class weights N / (K n_c) (a class absent from training weighs 0: it has no rows to weigh), or for
    multi-label per-label negatives / positives (1 for a label never on)."""
    if task == "multi_label_classification":
        onehot = torch.tensor(train_labels, dtype=torch.float32)
        positives = onehot.sum(0)
        negatives = len(onehot) - positives
        return torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones_like(positives))
    flat = torch.tensor([label for row in train_labels for label in (row if isinstance(row, list) else [row])])
    counts = torch.bincount(flat[flat >= 0], minlength=num_labels).float()
    present = counts > 0
    return torch.where(present, counts.sum() / (present.sum() * counts.clamp(min=1)), torch.zeros_like(counts))
