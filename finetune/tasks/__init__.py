"""Tasks by name: ``TASKS[recipe.task]`` is the object that owns what differs between tasks (columns,
labels and their checks, encoding and collation, loss and predictions from logits, the model class and
the names transformers and peft know it by). One module per task; see ``finetune.tasks.base.Task``.

The recipe schema keeps its own ``Task`` literal (it must not import torch); a test keeps the two equal.
"""

from finetune.tasks import classification, multi_label, regression, token_classification
from finetune.tasks.base import Task

TASKS: dict[str, Task] = {module.TASK.name: module.TASK
                          for module in (classification, regression, token_classification, multi_label)}

__all__ = ["TASKS", "Task"]
