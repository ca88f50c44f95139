"""A checkpoint's weights: the trainable parameters saved as safetensors (durably) and loaded back, and
a cheap check that each weight file of a checkpoint is whole before a run resumes from it."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from finetune.durable import settle, sync
from finetune.errors import RunFolderError
from finetune.runs import train_command


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu").contiguous().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(trainable_state(model), str(tmp))
    settle(tmp)
    os.replace(tmp, path)
    sync(path.parent)


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
