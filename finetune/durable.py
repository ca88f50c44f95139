"""Durable writes: each file or folder is written under a temporary name, flushed to disk and moved
into place, so an interrupted write or a power cut never leaves a half-written model or checkpoint."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def new_file_mode() -> int:
    """The mode a plain new file gets under this process's umask (safetensors writes 0600)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc: read it the only other way there is
    os.umask(mask)
    return 0o666 & ~mask


def sync(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
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
        sync(path)
        return
    for root, _, files in os.walk(path):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                settle(Path(root, name), mode)
        sync(Path(root))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync(path.parent)


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
    sync(final.parent)
    if old.exists():
        shutil.rmtree(old)


def publish_files(tmp: Path, run_dir: Path) -> None:
    """Move each file of a fully written (and flushed) folder into the run folder, then drop the folder."""
    settle(tmp)
    for item in tmp.iterdir():
        os.replace(item, run_dir / item.name)
    tmp.rmdir()
    sync(run_dir)


def link_or_copy(src: str, dst: str) -> None:
    """A hard link where the file system allows (no extra disk), else a copy; for ``shutil.copytree``."""
    try:
        Path(dst).hardlink_to(src)
    except OSError:  # another file system
        shutil.copy2(src, dst)
