"""Placeholder while the prune feature is written (issue 5); replaced by the real module."""


def add_arguments(parser) -> None:
    pass


def command(args) -> int:
    raise NotImplementedError("finetune prune is being written")
