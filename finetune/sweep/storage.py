"""Where a study lives: a journal file in the sweep folder by default, or a database URL."""

from __future__ import annotations

import random
import time
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

from finetune.config import RecipeError


def open_storage(url: str | None, sweep_dir: Path) -> optuna.storages.BaseStorage:
    if url is None:
        return JournalStorage(JournalFileBackend(str(sweep_dir / "study.journal")))
    if "://" in url:
        # Workers starting together on a fresh database race to create Optuna's tables; the loser
        # gets a unique-constraint error and succeeds on a second try, once the tables exist.
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
            except Exception as err:  # noqa: BLE001 - sqlalchemy and driver errors vary; name the URL
                if attempt < 4 and "IntegrityError" in type(err).__name__ + str(err):
                    time.sleep(0.5 + random.random())
                    continue
                raise RecipeError(f"sweep.storage: cannot open {url!r}: {type(err).__name__}: {err}") from None
    return JournalStorage(JournalFileBackend(url))
