"""The run folder: creation rules, atomic writes, trainable-weight checkpoints.

What leaves the folder for users (the exported model, tokenizer, label map, model card) is
written by ``finetune.publish``.

    RUN_DIR/
      recipe.yaml            the resolved recipe
      train.log              the log
      metrics.jsonl          one line per evaluation
      metrics.json           final metrics (best validation + test)
      label_map.json         id -> label
      README.md              model card
      config.json, model.safetensors, modeling_finetune.py, tokenizer files   (full / head_only / freeze)
      adapter_config.json, adapter_model.safetensors, base/                   (lora; merged/ with merge_lora)
      checkpoints/last/      resumable training state;  checkpoints/best.safetensors  best trainable weights

Everything is written to a temporary name and moved into place, so an interrupted
write never leaves a half-written model or checkpoint behind.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from finetune.config import Recipe, RecipeError


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


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder, and never delete a folder that isn't a run.

    Raises:
        RecipeError: the folder holds a run and neither resume nor overwrite was asked for; resume
            was asked for and there is no checkpoint; the folder holds other files.
    """
    last = run_dir / "checkpoints" / "last"
    if resume:
        recover_dir(last)
        if not last.is_dir():
            raise RecipeError(f"--resume: {run_dir} has no checkpoints/last to resume from")
        return
    holds_run = (run_dir / "recipe.yaml").is_file() and (run_dir / "train.log").is_file()
    if holds_run and not overwrite:
        raise RecipeError(f"output.dir: {run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
    if holds_run:
        shutil.rmtree(run_dir)
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise RecipeError(f"output.dir: {run_dir} is not empty and holds no finetune run; choose an empty or new folder")
    run_dir.mkdir(parents=True, exist_ok=True)


def check_same_recipe(run_dir: Path, recipe: Recipe) -> None:
    """A resumed run must continue the same recipe, or its checkpoints would mean something else."""
    saved = Recipe.from_yaml(run_dir / "recipe.yaml").to_dict()
    current = recipe.to_dict()
    saved["output"] = current["output"]  # where and how results are written doesn't change the training
    changed = [f"{section}.{key}" for section in current if isinstance(current[section], dict)
               for key in current[section] if current[section][key] != saved.get(section, {}).get(key)]
    changed += [key for key in current if not isinstance(current[key], dict) and current[key] != saved.get(key)]
    if changed:
        raise RecipeError(f"--resume: the recipe differs from the one this run started with ({', '.join(changed)}); "
                          "resume with the same settings, or start a new run")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def recover_dir(final: Path) -> None:
    """Finish an interrupted ``replace_dir``: if only the previous copy is left, put it back."""
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.is_dir():
        os.replace(old, final)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place, replacing an older one."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu").contiguous().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(trainable_state(model), str(tmp))
    os.replace(tmp, path)


def load_trainable(model: torch.nn.Module, path: Path) -> None:
    state = load_file(str(path))
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        raise RecipeError(f"checkpoint {path} does not match the model (unknown parameter {unknown[0]})")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
