"""Classification: one class per text (or text pair); softmax over the classes, cross-entropy loss.

Everything it does is the ``Task`` default (finetune.tasks.base)."""

from finetune.tasks.base import Task


class Classification(Task):
    name = "classification"


TASK = Classification()
