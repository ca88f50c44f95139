"""Progress on long work, fit for where it goes: a live bar on a terminal; in a redirected log (a file,
CI, a pipe) one line every 10 % of the main bar and nothing for short transient bars (each evaluation
is logged as its own line anyway); nothing at all with ``--quiet`` (``FINETUNE_QUIET=1``)."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import std
from tqdm.auto import tqdm

QUIET = "FINETUNE_QUIET"


def quiet() -> bool:
    return os.environ.get(QUIET, "") not in ("", "0")


def on_terminal() -> bool:
    """A terminal, or a notebook (tqdm.auto's widget bars draw in place there)."""
    return (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()) or any("notebook" in c.__module__ for c in tqdm.__mro__)


def bar(iterable: Any = None, *, desc: str = "", total: int | None = None, leave: bool = False,
        disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal; off the terminal, a line per 10 % when ``leave`` (a bar meant to stay,
    like training's), else none."""
    if disable or quiet() or not (on_terminal() or leave):
        return tqdm(iterable, desc=desc, total=total, disable=True, **kwargs)
    if on_terminal():
        return tqdm(iterable, desc=desc, total=total, leave=leave, **kwargs)
    return _Lines(iterable, desc=desc, total=total, leave=leave, **kwargs)


def hide_library_bars() -> None:
    """transformers', datasets' and the hub's own bars (loading weights, writing shards, mapping rows) are
    carriage-return noise in a log file and short on a terminal: shown only on a terminal, without --quiet."""
    if on_terminal() and not quiet():
        return
    import datasets
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


class _Lines(std.tqdm):
    """tqdm for a log file: a whole line at each tenth of the way (and at the end), no carriage returns."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._shown = -1
        super().__init__(*args, mininterval=0, miniters=1, ncols=100, dynamic_ncols=False, ascii=True, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "" or self.total is None:  # close() clearing a transient bar; no total: no tenths to show
            return True
        tenth = int(10 * self.n / max(self.total, 1))
        if tenth == self._shown:
            return True
        self._shown = tenth
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        return True
