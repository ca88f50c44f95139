"""The student's loss: the teacher's (soft) targets mixed with the gold labels, per task.

For a row with a gold label the loss is ``alpha * soft + (1 - alpha) * hard``; an unlabeled row (labelled by
the teacher only) has ``soft`` alone. With temperature T, soft losses on probabilities are computed on
distributions softened by T and scaled by T² (Hinton et al. 2015), so their gradients keep their size as T
changes. The teacher's stored probabilities p are softened as softmax(log p / T) (sigmoid(logit p / T) per
label): for a single teacher that is exactly its logits divided by T.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

EPSILON = 1e-7


def _weights(gold: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row weights of the soft and hard terms: (alpha, 1 - alpha) with a gold label, (1, 0) without."""
    gold = gold.float()
    return torch.where(gold > 0, alpha, 1.0), gold * (1.0 - alpha)


def classification(logits, labels, teacher, gold, temperature: float, alpha: float) -> torch.Tensor:
    soft_w, hard_w = _weights(gold, alpha)
    target = (teacher.clamp_min(EPSILON).log() / temperature).softmax(-1)
    soft = F.kl_div((logits / temperature).log_softmax(-1), target, reduction="none").sum(-1) * temperature ** 2
    hard = F.cross_entropy(logits, labels, reduction="none")
    return (soft_w * soft + hard_w * hard).mean()


def multi_label(logits, labels, teacher, gold, temperature: float, alpha: float) -> torch.Tensor:
    soft_w, hard_w = _weights(gold, alpha)
    p = teacher.clamp(EPSILON, 1 - EPSILON)
    target = (torch.log(p) - torch.log1p(-p)).div(temperature).sigmoid()
    soft = F.binary_cross_entropy_with_logits(logits / temperature, target, reduction="none").mean(-1)
    hard = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(-1)
    return (soft_w * soft * temperature ** 2 + hard_w * hard).mean()


def regression(logits, labels, teacher, gold, temperature: float, alpha: float) -> torch.Tensor:
    soft_w, hard_w = _weights(gold, alpha)
    prediction = logits.squeeze(-1)
    soft = (prediction - teacher) ** 2
    hard = (prediction - labels.float()) ** 2
    return (soft_w * soft + hard_w * hard).mean()


def token_classification(logits, labels, teacher, gold, temperature: float, alpha: float) -> torch.Tensor:
    """Per labelled token (first sub-words; labels of -100 are ignored), averaged over them."""
    soft_w, hard_w = _weights(gold, alpha)
    mask = labels != -100
    target = (teacher.clamp_min(EPSILON).log() / temperature).softmax(-1)
    soft = F.kl_div((logits / temperature).log_softmax(-1), target, reduction="none").sum(-1) * temperature ** 2
    hard = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="none").view_as(labels)
    per_token = soft_w[:, None] * soft + hard_w[:, None] * hard
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


LOSSES = {
    "classification": classification,
    "multi_label_classification": multi_label,
    "regression": regression,
    "token_classification": token_classification,
}
