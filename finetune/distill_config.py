"""The ``distill:`` section of a recipe: train this recipe's model (the student) on a teacher's outputs
as well as on the gold labels (see finetune.distill)."""

from __future__ import annotations

from pydantic import Field

from finetune.schema import Strict


class DistillConfig(Strict):
    teacher: str | None = None
    """A finished run folder or an ensemble folder whose outputs the student learns from (None: no distillation).
    Its outputs on the training rows are computed once and cached under $FINETUNE_CACHE/teacher."""
    temperature: float = Field(default=2.0, gt=0.0, le=100.0)
    """Softens both distributions before they are compared (classification and multi-label); the soft loss is
    scaled by temperature² so its gradients keep their size."""
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    """Weight of the teacher (soft) loss; 1 - alpha goes to the gold labels. Unlabeled rows learn from the teacher
    alone."""
    unlabeled: str | None = None
    """Extra unlabeled inputs the teacher labels: a .txt file (one text per line; for token classification, words
    separated by spaces) or a csv/tsv/json/jsonl file with the recipe's input columns."""
    max_unlabeled: int | None = Field(default=None, gt=0)
    """Use at most this many unlabeled rows (a seeded sample, data.subsample_seed)."""
