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
      adapter_config.json, adapter_model.safetensors, base/                   (lora; merged/ with merge_lora)
      checkpoints/last/      resumable training state;  checkpoints/last/best.safetensors  best trainable weights
      pruned/, pruned-*/     pruned runs;  <recipe name>/, .aim/  tracker logs (output.report_to)
      .lock                  held (flock) while a run writes here

Everything is written to a temporary name, flushed to disk and moved into place, so an
interrupted write or a power cut never leaves a half-written model or checkpoint behind.
``--overwrite`` deletes only the names above; anything else in the folder stops it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import socket
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from finetune.config import DataConfig, Recipe
from finetune.errors import RunFolderError

# --- the layout: every name finetune writes into a run folder -----------------------------

LOCK_FILE = ".lock"
DATA_FINGERPRINT = "data_fingerprint.json"
CHECKPOINT = Path("checkpoints") / "last"
TEMPORARY = (".*.tmp", ".*.old")  # written aside, then moved into place
MODEL_FILES = ("config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
               "generation_config.json", "modeling_finetune.py", "label_map.json", "tokenizer*", "vocab.*",
               "merges.txt", "special_tokens_map.json", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
               "chat_template.*", "README.md", *TEMPORARY)
RUN_FILES = (*MODEL_FILES, "recipe.yaml", "train.log", "metrics.jsonl", "metrics.json", "data_report.json",
             DATA_FINGERPRINT, "adapter_config.json", "adapter_model.safetensors", "prune_report.json",
             "prune_report.md", "MODEL_REMOVED.txt", "sweep_trial.json", LOCK_FILE)
# folder name -> what it holds: "model" (MODEL_FILES), "run" (a run folder), None (a library's own files)
RUN_FOLDERS = {"checkpoints": None, "base": "model", "merged": "model", "pruned": "run", "pruned-*": "run",
               ".aim": None, ".*.tmp": None, ".*.old": None}


@dataclass
class RunResult:
    run_dir: Path
    """The run folder (loads with transformers / peft, see README)."""
    metrics: dict[str, Any]
    """Final metrics: {'validation': {...best evaluation...}, 'test': {...}, ...}."""
    best_step: int
    """Optimizer step of the best evaluation."""
    best_checkpoint: Path
    """Trainable weights of the best evaluation (the exported model equals them)."""
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
        if kind == "unknown" or patterns is MODEL_FILES:  # an exported model has no sub-folders
            found.append(relative + "/")
        elif kind == "model":
            found += _unknown(item, relative + "/", set(), MODEL_FILES)
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
    finished = (run_dir / "metrics.json").is_file()
    started = (run_dir / "recipe.yaml").is_file()
    entries = [p.name for p in sorted(run_dir.iterdir())
               if p.name != LOCK_FILE and not any(fnmatchcase(p.name, t) for t in TEMPORARY)]
    if resume and resumable:
        return "resume"
    if resume and finished:
        raise RunFolderError(f"--resume: {run_dir} holds a finished run without checkpoints/last: nothing to resume; "
                             "pass --overwrite instead to train it again")
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


def check_same_recipe(run_dir: Path, recipe: Recipe) -> None:
    """A resumed run must continue the same recipe, or its checkpoints would mean something else."""
    saved = Recipe.from_yaml(run_dir / "recipe.yaml").to_dict()
    current = recipe.to_dict()
    saved["output"] = current["output"]  # where and how results are written doesn't change the training
    changed = [f"{section}.{key}" for section in current if isinstance(current[section], dict)
               for key in current[section] if current[section][key] != saved.get(section, {}).get(key)]
    changed += [key for key in current if not isinstance(current[key], dict) and current[key] != saved.get(key)]
    if changed:
        raise RunFolderError(f"--resume: the recipe differs from the one this run started with ({', '.join(changed)}); "
                             "resume with the same settings, or start a new run")


# --- the data a run started with ------------------------------------------------------------

FULL_HASH_BYTES = 256 << 20  # larger files: 64 samples of 1 MiB, with size and mtime


def data_fingerprint(cfg: DataConfig) -> dict[str, dict[str, Any]]:
    """Per local data file (a mirror's or this project's copy included; none for a hub data set): size,
    mtime and a content hash (blake2b reads ~1 GB/s: 60k rows take ~20 ms)."""
    from finetune.sources import local_files

    prints = {}
    for path in local_files(cfg):
        stat, digest = path.stat(), hashlib.blake2b(digest_size=16)
        whole = stat.st_size <= FULL_HASH_BYTES
        with open(path, "rb") as f:
            if whole:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            else:
                for i in range(64):
                    f.seek(i * (stat.st_size - (1 << 20)) // 63)
                    digest.update(f.read(1 << 20))
        prints[str(path)] = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                             "blake2b": digest.hexdigest(), "whole_file": whole}
    return prints


def check_same_data(run_dir: Path, current: dict[str, dict[str, Any]]) -> bool:
    """Refuse to resume on data that changed since the run started; False when the run recorded none.

    Raises:
        RunFolderError: naming the first changed, missing or new data file.
    """
    try:
        saved = json.loads((run_dir / DATA_FINGERPRINT).read_text())
    except (OSError, ValueError):  # an older run, or a damaged record: the caller says it could not check
        return False
    way_out = ("a resumed run must see the data it started with: restore it, or start a new run with "
               f"{train_command(run_dir, '--overwrite')}")
    for path in sorted(set(saved) | set(current)):
        before, now = saved.get(path), current.get(path)
        if before is None:
            raise RunFolderError(f"--resume: the data is now read from {path}, which this run did not start "
                                 f"with; {way_out}")
        if now is None:
            raise RunFolderError(f"--resume: data file {path} is gone or no longer read; {way_out}")
        if before["size"] != now["size"]:
            change = f"{before['size']} bytes then, {now['size']} now"
        elif before["blake2b"] != now["blake2b"] or (not before["whole_file"]
                                                     and before["mtime_ns"] != now["mtime_ns"]):
            change = "same size, different contents"
        else:
            continue
        raise RunFolderError(f"--resume: data file {path} changed since this run started ({change}); {way_out}")
    return True


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


def new_file_mode() -> int:
    """The mode a plain new file gets under this process's umask (safetensors writes 0600)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc: read it the only other way there is
    os.umask(mask)
    return 0o666 & ~mask


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def settle(path: Path, mode: int | None = None) -> None:
    """Give a file (or every file of a folder) the folder's usual mode and flush it to disk, folders too."""
    mode = new_file_mode() if mode is None else mode
    if not path.is_dir():
        if path.stat().st_mode & 0o777 != mode:
            os.chmod(path, mode)
        _sync(path)
        return
    for root, _, files in os.walk(path):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                settle(Path(root, name), mode)
        _sync(Path(root))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync(path.parent)


def recover_dir(final: Path) -> None:
    """Finish an interrupted ``replace_dir``: if only the previous copy is left, put it back."""
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.is_dir():
        os.replace(old, final)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written (and flushed) folder into place, replacing an older one."""
    settle(tmp)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _sync(final.parent)
    if old.exists():
        shutil.rmtree(old)


def publish_files(tmp: Path, run_dir: Path) -> None:
    """Move each file of a fully written (and flushed) folder into the run folder, then drop the folder."""
    settle(tmp)
    for item in tmp.iterdir():
        os.replace(item, run_dir / item.name)
    tmp.rmdir()
    _sync(run_dir)


# --- trainable weights -----------------------------------------------------------------------


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu").contiguous().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(trainable_state(model), str(tmp))
    settle(tmp)
    os.replace(tmp, path)
    _sync(path.parent)


def check_checkpoint_files(folder: Path) -> None:
    """Each weight file of a checkpoint is whole, read cheaply from its ends: a .safetensors header and
    the bytes it announces; the central directory at the end of torch's zip files (optimizer, RNG).

    Raises:
        RunFolderError: naming the damaged file.
    """
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):
                    pass
            elif path.is_file() and _starts_with(path, b"PK\x03\x04"):
                zipfile.ZipFile(path).close()
        except (SafetensorError, zipfile.BadZipFile) as err:
            raise RunFolderError(f"{path} is damaged or truncated ({err}); the run can't continue from it: start "
                                 f"again with {train_command(folder.parent.parent, '--overwrite')}") from None


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def load_trainable(model: torch.nn.Module, path: Path) -> None:
    try:
        state = load_file(str(path))
    except SafetensorError as err:
        raise RunFolderError(f"{path} is damaged or truncated ({err})") from None
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        raise RunFolderError(f"checkpoint {path} does not match the model (unknown parameter {unknown[0]})")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
