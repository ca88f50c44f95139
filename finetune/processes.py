"""Processes and their surroundings: the console and file log, the run folder name, trackers,
CPU-only multi-process launches, main-process file actions and the process group's end.
Shared by the training loop and the sweep runner."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator, PartialState
from accelerate.tracking import filter_trackers
from accelerate.utils import broadcast_object_list

from finetune import errors, progress, runs
from finetune.config import RecipeConfig, RecipeError

T = TypeVar("T")
log = logging.getLogger("finetune")
LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")

class CurrentStderr(logging.StreamHandler):
    """A console handler that writes to ``sys.stderr`` as it is when a line is logged, not as it was when the
    handler was made: a notebook or a test may swap stderr and close the old one, which a plain StreamHandler
    would keep writing to (a "Logging error" instead of the line)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the current stderr is always used
        pass


def setup_logging(accelerator: Accelerator, quiet: bool = False) -> None:
    """Readable INFO lines from the main process; the other processes only warn."""
    progress.hide_library_bars()
    log.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    for handler in list(log.handlers):  # an earlier run's (in a sweep or notebook): close its log file
        handler.close()
        log.removeHandler(handler)
    log.propagate = False
    handler = CurrentStderr()
    handler.setFormatter(LOG_FORMAT)
    handler.setLevel(logging.WARNING if quiet or progress.quiet() else logging.INFO)
    log.addHandler(handler)


def command_logging(tag: str = "", file: Path | None = None, replace: bool = True,
                    logger: logging.Logger = log) -> None:
    """INFO lines on stderr (and in ``file``) for a command around runs: sweep, compare, prune, ensemble.
    ``replace=False`` keeps the handlers a run already set up (a command between two runs)."""
    if logger.handlers and not replace:
        return
    for handler in list(logger.handlers):  # a fresh handler per command: a notebook or test may swap stderr
        handler.close()
        logger.removeHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a parent logger would print each line again
    fmt = logging.Formatter(f"%(asctime)s [{tag}] %(message)s", "%H:%M:%S") if tag else LOG_FORMAT
    console = CurrentStderr()
    console.setLevel(logging.WARNING if progress.quiet() else logging.INFO)
    for handler in (console, *([logging.FileHandler(file)] if file else [])):
        handler.setFormatter(fmt)
        logger.addHandler(handler)


def log_to_file(accelerator: Accelerator, run_dir: Path) -> None:
    if accelerator.is_main_process:
        handler = logging.FileHandler(run_dir / runs.LOG)
        handler.setFormatter(LOG_FORMAT)
        log.addHandler(handler)


def write_to_log_file(message: str, level: int = logging.ERROR) -> None:
    """A line for train.log only: the command line prints an expected error itself, once."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def default_run_dir(recipe: RecipeConfig, accelerator: Accelerator) -> Path:
    if recipe.output.dir:
        return Path(recipe.output.dir)
    stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
    broadcast_object_list(stamp)  # every process must write to the same folder
    return runs.output_home() / "runs" / f"{recipe.name}-{stamp[0]}"


def set_trackers(accelerator: Accelerator, recipe: RecipeConfig, run_dir: Path) -> None:
    """Point Accelerate's trackers (report_to) at the run folder, which is known only now."""
    if not recipe.output.report_to:
        return
    accelerator.project_configuration.set_directories(str(run_dir))
    try:
        accelerator.log_with = filter_trackers(recipe.output.report_to, accelerator.logging_dir)
    except (ValueError, ImportError) as err:
        raise RecipeError(f"output.report_to: {err}") from None
    missing = sorted(set(recipe.output.report_to) - {str(t) for t in accelerator.log_with})
    if missing:  # Accelerate skips trackers whose package is missing; a user asking for one wants to know
        raise RecipeError(f"output.report_to: {missing} requested but not installed (pip install {' '.join(missing)})")


def multi_process_without_accelerator() -> bool:
    """`accelerate launch --multi_gpu --num_processes N` on a machine without GPUs: DDP on CPU (gloo).

    Accelerate only picks its multi-CPU backend when told the run is on CPU; otherwise each
    process would silently train alone and all of them would write the same run folder.
    """
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return several and not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available())


def on_main_process(accelerator: Accelerator, action: Callable[[], T]) -> T:
    """Run a file-system action on the main process and hand its result to every process; if it
    fails, every process raises the error (an expected one as the same class and message)."""
    outcome: list = [None, None]  # [result, (error class name, message)]
    if accelerator.is_main_process:
        try:
            outcome[0] = action()
        except Exception as err:
            if accelerator.num_processes == 1:
                raise
            expected = isinstance(err, errors.FinetuneError) and hasattr(errors, type(err).__name__)
            outcome[1] = ((type(err).__name__, str(err)) if expected
                          else ("RuntimeError", f"{type(err).__name__}: {err}"))
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)  # without this, the other processes would wait forever
    if outcome[1]:
        name, message = outcome[1]
        raise getattr(errors, name, RuntimeError)(message)
    return outcome[0]


def end_processes() -> None:
    """Tear down the process group at the very end of a multi-process command."""
    if PartialState._shared_state and PartialState().num_processes > 1:
        PartialState().destroy_process_group()
