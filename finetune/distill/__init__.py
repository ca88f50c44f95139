"""Knowledge distillation: train a smaller student on a teacher's outputs (a finished run or an ensemble).

    finetune distill --teacher RUN_OR_ENSEMBLE [--layers 3] [--student RECIPE] [key=value ...]

The recipe's ``distill:`` section (``finetune.distill_config``) names the teacher, the temperature, the
weight of the soft loss and an optional file of unlabeled inputs; a sweep can search those keys like any
other. Modules, in data-flow order: ``teacher`` (load the teacher, compute and cache its targets) ->
``loss`` (soft + hard loss per task) -> ``student`` (the training rows with their targets, the collator and
the loss the loop calls) -> ``command`` (the CLI: a student recipe from the teacher's).
"""

from finetune.distill.command import add_arguments, command, student_recipe

__all__ = ["add_arguments", "command", "student_recipe"]
