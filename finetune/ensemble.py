"""Placeholder while the ensemble feature is written (issue 5); replaced by the real module."""


def add_arguments(parser) -> None:
    pass


def command(args) -> int:
    raise NotImplementedError("finetune ensemble is being written")


def is_ensemble(path) -> bool:
    return False
