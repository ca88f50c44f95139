"""The run folder: its layout, creation rules, lock, data fingerprint, durable writes and checkpoints.

What leaves the folder for users (the exported model, tokenizer, label map, model card) is
written by ``finetune.publish``.

    RUN_DIR/
      recipe.yaml            the resolved recipe (what actually ran)
      train.log              the log
      metrics.jsonl          one line per evaluation
      metrics.json           final metrics (best validation + test)
      data_report.json       per-split data summary
      data_fingerprint.json  size, mtime and hash of each data file the run started with (checked by --resume)
      label_map.json         id -> label
      README.md              model card
      config.json, model.safetensors, modeling_finetune.py, tokenizer files   (full / head_only / freeze)
      adapter_config.json, adapter_model.safetensors, base/                   (lora, dora, ia3; merged/ with merge_lora)
      checkpoints/last/      resumable training state;  checkpoints/last/best.safetensors  best trainable weights
      pruned/, pruned-*/     pruned runs;  <recipe name>/, .aim/  tracker logs (output.report_to)
      analysis/              finetune analyze's report (report.md, analysis.json, PNGs)
      calibration.json       a temperature fitted by finetune analyze --fit-temperature (predict applies it)
      .lock                  held (flock) while a run writes here

Everything is written to a temporary name, flushed to disk and moved into place, so an
interrupted write or a power cut never leaves a half-written model or checkpoint behind.
``--overwrite`` deletes only the names above; anything else in the folder stops it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from finetune.config import RecipeConfig
from finetune.durable import (  # noqa: F401  (re-exported: run-folder code writes through these)
    atomic_write_text,
    new_file_mode,
    publish_files,
    recover_dir,
    replace_dir,
    settle,
    sync,
)
from finetune.errors import RunFolderError

# --- the layout: every name finetune writes into a run folder -----------------------------

LOCK_FILE = ".lock"
RECIPE = "recipe.yaml"
LOG = "train.log"
HISTORY = "metrics.jsonl"  # one line per evaluation
METRICS = "metrics.json"  # the final metrics: a run that has them finished
DATA_REPORT = "data_report.json"
DATA_FINGERPRINT = "data_fingerprint.json"
LABEL_MAP = "label_map.json"
MODEL_REMOVED = "MODEL_REMOVED.txt"  # a sweep removed this trial's model to save disk
ANALYSIS = "analysis"  # finetune analyze's report folder
CALIBRATION = "calibration.json"  # the temperature finetune analyze --fit-temperature fitted; predict applies it
CHECKPOINTS = "checkpoints"
CHECKPOINT = Path(CHECKPOINTS) / "last"
BEST_WEIGHTS = "best.safetensors"  # inside CHECKPOINT: the best evaluation's trainable weights
WEIGHTS = ("model.safetensors", "adapter_model.safetensors")  # an exported model: full, or an adapter
TEMPORARY = (".*.tmp", ".*.old")  # written aside, then moved into place
MODEL_FILES = ("config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
               "generation_config.json", "modeling_finetune.py", "label_map.json", "tokenizer*", "vocab.*",
               "merges.txt", "special_tokens_map.json", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
               "chat_template.*", "README.md", *TEMPORARY)
RUN_FILES = (*MODEL_FILES, RECIPE, LOG, HISTORY, METRICS, DATA_REPORT, DATA_FINGERPRINT, "adapter_config.json",
             "adapter_model.safetensors", "prune_report.json", "prune_report.md", MODEL_REMOVED, "sweep_trial.json",
             CALIBRATION, LOCK_FILE)
KEPT_WITHOUT_MODEL = {RECIPE, LOG, HISTORY, METRICS, "README.md", LABEL_MAP, ANALYSIS}  # what remove_model leaves
# folder name -> what it holds: "model" (MODEL_FILES), "run" (a run folder), None (a library's own files)
RUN_FOLDERS = {CHECKPOINTS: None, "base": "model", "merged": "model", "pruned": "run", "pruned-*": "run",
               ".aim": None, ANALYSIS: "analysis", ".*.tmp": None, ".*.old": None}
ANALYSIS_FILES = ("report.md", "analysis.json", "*.png")  # what finetune analyze writes (no sub-folders)


@dataclass
class RunResult:
    run_dir: Path
    """The run folder (loads with transformers / peft, see README)."""
    metrics: dict[str, Any]
    """Final metrics: {'validation': {...best evaluation...}, 'test': {...}, ...}."""
    best_step: int
    """Optimizer step of the best evaluation."""
    best_checkpoint: Path | None
    """Trainable weights of the best evaluation in checkpoints/last (the exported model equals them); None once
    output.keep=model removed the checkpoint."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every evaluation, as in metrics.jsonl."""


def unknown_entries(run_dir: Path) -> list[str]:
    """Files and folders in a run folder that finetune did not write (relative paths, folders end in /)."""
    trackers = set()
    with contextlib.suppress(Exception):  # the tracker log folder is named after the recipe that wrote it
        saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        if saved.get("output", {}).get("report_to"):
            trackers.add(str(saved["name"]))
    return _unknown(run_dir, "", trackers)


def _unknown(folder: Path, prefix: str, trackers: set[str], patterns: tuple[str, ...] = RUN_FILES) -> list[str]:
    found = []
    for item in sorted(folder.iterdir()):
        name, relative = item.name, prefix + item.name
        if not item.is_dir() or item.is_symlink():
            found += [] if any(fnmatchcase(name, p) for p in patterns) else [relative]
            continue
        if name in trackers:
            continue
        kind = next((kind for pattern, kind in RUN_FOLDERS.items() if fnmatchcase(name, pattern)), "unknown")
        if kind == "unknown" or patterns is not RUN_FILES:  # an exported model or an analysis has no sub-folders
            found.append(relative + "/")
        elif kind == "model":
            found += _unknown(item, relative + "/", set(), MODEL_FILES)
        elif kind == "analysis":
            found += _unknown(item, relative + "/", set(), ANALYSIS_FILES)
        elif kind == "run":
            found += _unknown(item, relative + "/", set())
        # None: a library's own files (Accelerate's checkpoint state, tracker logs)
    return found


# --- opening a run folder -----------------------------------------------------------------


class RunFolderLock:
    """An exclusive ``flock`` on RUN_DIR/.lock for as long as a run writes there. The kernel drops it
    when its process dies, so a crashed run never blocks the next one; the file names the holder."""

    def __init__(self, run_dir: Path):
        self.path, self.fd = run_dir / LOCK_FILE, None
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "a process that has not named itself yet"
                os.close(fd)
                raise RunFolderError(f"output.dir: {run_dir} is in use by another run ({holder}); wait for it to "
                                     "end, or choose another output.dir") from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.fd = fd
                    break
            os.close(fd)  # its holder released and removed it while we opened it: lock the new file
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # removed while still held, so nobody locks a file on its way out
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def open_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> tuple[RunFolderLock, str]:
    """Create or reopen a run folder and lock it. Returns the lock and what was found: "new",
    "resume" (a checkpoint to continue), "restart" (a run that stopped before its first checkpoint,
    cleared so the same command starts again) or "replace" (a run cleared by overwrite).

    Raises:
        RunFolderError: the folder is locked by a running run; holds a run and neither resume nor
            overwrite was asked for; holds files finetune did not write (nothing is deleted then);
            resume was asked for and there is nothing to resume; it can't be created.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"output.dir: {run_dir} is a file, not a folder; choose a folder path")
    if resume and not run_dir.is_dir():
        raise RunFolderError(f"--resume: {run_dir} does not exist, so there is no checkpoints/last to resume from; "
                             "check output.dir, or drop --resume to start a new run")
    created = not run_dir.exists()
    with folder_errors(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = RunFolderLock(run_dir)
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
            raise
    try:
        return lock, _claim(run_dir, resume, overwrite)
    except BaseException:
        lock.release()
        raise


def _claim(run_dir: Path, resume: bool, overwrite: bool) -> str:
    recover_dir(run_dir / CHECKPOINT)
    resumable = (run_dir / CHECKPOINT / "train_state.json").is_file()
    finished = (run_dir / METRICS).is_file()
    started = (run_dir / RECIPE).is_file()
    entries = [p.name for p in sorted(run_dir.iterdir())
               if p.name != LOCK_FILE and not any(fnmatchcase(p.name, t) for t in TEMPORARY)]
    if resume and resumable:
        return "resume"
    if resume and finished:
        raise RunFolderError(f"--resume: {run_dir} holds a finished run without checkpoints/last (output.keep=model "
                             "removes it once a run finishes; output.keep=model+checkpoint keeps it): nothing to "
                             "resume; pass --overwrite instead to train it again")
    if not entries:
        if resume:
            raise RunFolderError(f"--resume: {run_dir} is empty: no checkpoints/last to resume from; drop --resume "
                                 "to start a new run")
        return "new"
    if not (started or resumable or finished):
        raise RunFolderError(f"output.dir: {run_dir} is not empty and holds no finetune run ({_listed(entries)}); "
                             "choose an empty or new folder")
    if (resumable or finished) and not overwrite:
        what = f"a checkpoint at step {checkpoint_step(run_dir)}" if resumable else "a finished run"
        raise RunFolderError(f"output.dir: {run_dir} already holds a run ({what}); pass --resume to continue it or "
                             "--overwrite to replace it")
    unknown = unknown_entries(run_dir)
    if unknown:
        raise RunFolderError(f"output.dir: {run_dir} holds files finetune did not write ({_listed(unknown)}); nothing "
                             "was deleted: move them out of the run folder, or choose another output.dir")
    for item in run_dir.iterdir():
        if item.name != LOCK_FILE:
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    return "replace" if resumable or finished else "restart"


def _listed(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def checkpoint_step(run_dir: Path) -> int | None:
    """The optimizer step of the run's last checkpoint, or None when it has none."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads((run_dir / CHECKPOINT / "train_state.json").read_text())["global_step"])
    return None


def kept(run_dir: Path) -> str:
    """What a stopped run leaves to continue from, in words."""
    step = checkpoint_step(run_dir)
    return f"the checkpoint at step {step} in {run_dir / CHECKPOINT}" if step is not None else "no checkpoint yet"


def train_command(run_dir: Path, *extra: str) -> str:
    """The command that runs this folder's recipe again (its recipe.yaml names the folder)."""
    return " ".join(["finetune train --recipe", shlex.quote(str(run_dir / "recipe.yaml")), *extra])


HOME = "FINETUNE_HOME"


def output_home() -> Path:
    """Where runs/, sweeps/ and ensembles/ go when no folder is named: $FINETUNE_HOME, else the current
    folder (set it once, and the same command run from two places keeps its results together)."""
    return Path(os.environ.get(HOME) or ".").expanduser()


def has_model(run_dir: Path) -> bool:
    """A finished run whose model is still there (a sweep may have removed it to save disk)."""
    return (run_dir / LABEL_MAP).is_file() and not (run_dir / MODEL_REMOVED).exists()


def remove_checkpoints(run_dir: Path) -> None:
    """The exported model is the best checkpoint; the resumable state isn't needed once a run ends."""
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)


def remove_model(run_dir: Path, reason: str) -> None:
    """Delete a finished run's model files, keeping its recipe, log, metrics and card, and say why."""
    if not run_dir.is_dir() or (run_dir / MODEL_REMOVED).exists():
        return
    for item in run_dir.iterdir():
        if item.name not in KEPT_WITHOUT_MODEL and not item.name.startswith("seed-"):
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    (run_dir / MODEL_REMOVED).write_text(f"The model files were removed to save disk: {reason}.\n")


def check_same_recipe(run_dir: Path, recipe: RecipeConfig) -> None:
    """A resumed run must continue the same recipe, or its checkpoints would mean something else."""
    saved = RecipeConfig.from_yaml(run_dir / "recipe.yaml").to_dict()
    current = recipe.to_dict()
    saved["output"] = current["output"]  # where and how results are written doesn't change the training
    changed = [f"{section}.{key}" for section in current if isinstance(current[section], dict)
               for key in current[section] if current[section][key] != saved.get(section, {}).get(key)]
    changed += [key for key in current if not isinstance(current[key], dict) and current[key] != saved.get(key)]
    if changed:
        raise RunFolderError(f"--resume: the recipe differs from the one this run started with ({', '.join(changed)}); "
                             "resume with the same settings, or start a new run")


def check_output_folder(path: str | Path, flag: str) -> None:
    """Before any slow work: an output folder can be created and written there (no file on its path).

    Raises:
        RunFolderError: ``path`` is a file, a file stands where a parent folder should be, or no write permission.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path and not path.is_dir():
        raise RunFolderError(f"{flag}: {path} is a file; give a folder")
    if not existing.is_dir():
        raise RunFolderError(f"{flag}: {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"{flag}: {path}: no permission to write in {existing}")



# --- durable writes ------------------------------------------------------------------------

# what the file system says -> what the user can do about it
FOLDER_ERRNOS = {
    errno.EACCES: "check the folder's permissions, or choose another output.dir",
    errno.EPERM: "check the folder's permissions, or choose another output.dir",
    errno.EROFS: "the file system is read-only; choose another output.dir",
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some disk space (quota)",
    errno.EFBIG: "the file system can't hold a file this large",
    errno.ENOTDIR: "a file is in the way of the folder path; choose another output.dir",
    errno.EISDIR: "a folder is in the way of a file the run writes",
    errno.ENOENT: "a folder on that path is missing (moved or deleted while the run wrote to it?)",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter output.dir",
}


@contextlib.contextmanager
def folder_errors(run_dir: Path) -> Iterator[None]:
    """Turn a file-system error while writing a run folder into one line naming the path."""
    try:
        yield
    except OSError as err:
        if err.errno not in FOLDER_ERRNOS:
            raise
        stopped = ""
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            stopped = f"; kept: {kept(run_dir)}" + (f"; then resume with: {train_command(run_dir, '--resume')}"
                                                   if checkpoint_step(run_dir) is not None else "")
        raise RunFolderError(f"run folder {run_dir}: {err.filename or run_dir}: {err.strerror}; "
                             f"{FOLDER_ERRNOS[err.errno]}{stopped}") from None
