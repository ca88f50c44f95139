"""Read-once objects shared by the runs of one process, such as a sweep's trials.

Inside ``sharing()``, ``reuse(key, make)`` builds each object once and hands later callers the
same object (tokenised data sets, which runs never modify) or a private copy (a pretrained
backbone, which training modifies). Outside it nothing is kept, so a single run holds no extra memory.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Hashable, Iterator
from typing import TypeVar

T = TypeVar("T")
_store: dict[Hashable, object] | None = None


@contextlib.contextmanager
def sharing() -> Iterator[None]:
    """Share read-once objects between the runs started inside this block."""
    global _store
    outer = _store
    _store = {} if outer is None else outer
    try:
        yield
    finally:
        _store = outer


def reuse(key: Hashable, make: Callable[[], T], private: bool = False) -> T:
    """``make()`` once per key inside ``sharing()``; ``private`` hands out deep copies (for objects the
    caller will modify, e.g. weights about to be trained)."""
    if _store is None:
        return make()
    if key not in _store:
        _store[key] = make()
    return copy.deepcopy(_store[key]) if private else _store[key]  # type: ignore[return-value]
