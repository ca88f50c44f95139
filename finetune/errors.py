"""Expected errors: bad input that the user can fix. Each message names what was wrong (file and
line, key, row or path) and what was expected; the command line prints it as one line and exits
non-zero. Anything else that escapes is a bug and keeps its traceback."""

from pathlib import Path


class FinetuneError(Exception):
    """An expected failure with a message a user can act on."""


class RecipeError(FinetuneError, ValueError):
    """A recipe (file, override or field) is invalid; the message names the key."""


class DataError(RecipeError):
    """A data file is malformed or its contents can't train what the recipe asks; names file and row."""


class RunFolderError(RecipeError):
    """A run folder can't be written, resumed or replaced safely; names the folder and the way out."""


class TrainingDiverged(FinetuneError, RuntimeError):
    """The loss became NaN or infinite; says at which step, what was kept and the command to retry."""


class Interrupted(FinetuneError):
    """Training was stopped by Ctrl-C; says what was kept and the exact command to resume or retry."""


def file_in_traceback(err: BaseException, suffixes: tuple[str, ...]) -> str | None:
    """The file a reader was reading when it failed: the innermost frame variable that names an existing file."""
    found = None
    tb = err.__traceback__
    while tb is not None:  # outermost to innermost; the last match is the one closest to the failure
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, (str, Path)) and str(value).endswith(suffixes) and Path(value).is_file():
                found = str(value)
        tb = tb.tb_next
    return found


def hide_unactionable_warnings() -> None:
    """Warnings a user can't act on. peft reads transformers' deprecated `is_gradient_checkpointing` when it
    wraps or loads an adapter (every LoRA run, predict, eval, prune and ensemble)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                            module=r"transformers\.modeling_utils")
