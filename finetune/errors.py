"""Expected errors: bad input that the user can fix. Each message names what was wrong (file and
line, key, row or path) and what was expected; the command line prints it as one line and exits
non-zero. Anything else that escapes is a bug and keeps its traceback."""


class FinetuneError(Exception):
    """An expected failure with a message a user can act on."""


class RecipeError(FinetuneError, ValueError):
    """A recipe (file, override or field) is invalid; the message names the key."""


class DataError(RecipeError):
    """A data file is malformed or its contents can't train what the recipe asks; names file and row."""


class RunFolderError(RecipeError):
    """A run folder can't be written, resumed or replaced safely; names the folder and the way out."""
