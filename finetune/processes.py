"""Processes and their surroundings: the console and file log, the run folder name, trackers,
CPU-only multi-process launches, main-process file actions and the process group's end.
Shared by the training loop and the sweep runner."""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.tracking import filter_trackers
from accelerate.utils import broadcast_object_list

from finetune.config import Recipe, RecipeError

log = logging.getLogger("finetune")
LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")

def setup_logging(accelerator: Accelerator, quiet: bool = False) -> None:
    """Readable INFO lines from the main process; the other processes only warn."""
    log.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    for handler in list(log.handlers):  # an earlier run's (in a sweep or notebook): close its log file
        handler.close()
        log.removeHandler(handler)
    log.propagate = False
    handler = logging.StreamHandler()
    handler.setFormatter(LOG_FORMAT)
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    log.addHandler(handler)


def log_to_file(accelerator: Accelerator, run_dir: Path) -> None:
    if accelerator.is_main_process:
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(LOG_FORMAT)
        log.addHandler(handler)


def default_run_dir(recipe: Recipe, accelerator: Accelerator) -> Path:
    if recipe.output.dir:
        return Path(recipe.output.dir)
    stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
    broadcast_object_list(stamp)  # every process must write to the same folder
    return Path("runs") / f"{recipe.name}-{stamp[0]}"


def set_trackers(accelerator: Accelerator, recipe: Recipe, run_dir: Path) -> None:
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


def on_main_process(accelerator: Accelerator, action) -> None:
    """Run a file-system action on the main process; if it fails, every process raises the error."""
    error = [None]
    if accelerator.is_main_process:
        try:
            action()
        except Exception as err:
            if accelerator.num_processes == 1:
                raise
            error[0] = (isinstance(err, RecipeError), f"{type(err).__name__}: {err}")
    broadcast_object_list(error)  # without this, the other processes would wait forever
    if error[0]:
        is_recipe_error, message = error[0]
        raise (RecipeError if is_recipe_error else RuntimeError)(message)


def end_processes() -> None:
    """Tear down the process group at the very end of a multi-process command."""
    if PartialState._shared_state and PartialState().num_processes > 1:
        PartialState().destroy_process_group()
