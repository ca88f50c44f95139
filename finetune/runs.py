"""The run folder: creation rules, model export, model card, and loading a finished run.

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

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from finetune.config import Recipe, RecipeError
from finetune.modeling import AUTO_MAP

MODELING_FILE = Path(__file__).with_name("modeling.py")


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


def _save_plain(model, folder: Path) -> None:
    model.config.auto_map = AUTO_MAP
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copyfile(MODELING_FILE, folder / "modeling_finetune.py")


def save_base(model, run_dir: Path) -> None:
    """LoRA runs: the untouched model the adapter applies to, so peft can load the run."""
    tmp = run_dir / ".base.tmp"
    _save_plain(model, tmp)
    replace_dir(tmp, run_dir / "base")


def export_model(model, tokenizer, labels: list[str] | None, run_dir: Path, merge_lora: bool) -> None:
    """Write the model (plain or adapter), tokenizer and label map into the run folder."""
    from peft import PeftModel

    tmp = run_dir / ".model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    if isinstance(model, PeftModel):
        model.save_pretrained(tmp, safe_serialization=True)
        adapter_cfg = json.loads((tmp / "adapter_config.json").read_text())
        adapter_cfg["base_model_name_or_path"] = str((run_dir / "base").resolve())
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
        if merge_lora:
            merged = run_dir / ".merged.tmp"
            import copy

            _save_plain(copy.deepcopy(model).merge_and_unload(), merged)
            tokenizer.save_pretrained(merged)
            replace_dir(merged, run_dir / "merged")
    else:
        _save_plain(model, tmp)
    tokenizer.save_pretrained(tmp)
    label_map = {str(i): name for i, name in enumerate(labels)} if labels else {}
    (tmp / "label_map.json").write_text(json.dumps(label_map, indent=2))
    for item in tmp.iterdir():  # move each file into the run folder root
        os.replace(item, run_dir / item.name)
    tmp.rmdir()


def write_model_card(recipe: Recipe, run_dir: Path, metrics: dict[str, Any], trainable: int, total: int) -> None:
    def table(split: str) -> str:
        rows = metrics.get(split) or {}
        return "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows.items())

    is_lora = recipe.policy.kind == "lora"
    kind = "TokenClassification" if recipe.task == "token_classification" else "SequenceClassification"
    pipeline_task = "token-classification" if recipe.task == "token_classification" else "text-classification"
    load = (
        f"import finetune  # registers the architecture\nfrom peft import AutoPeftModelFor{kind}\n"
        f"model = AutoPeftModelFor{kind}.from_pretrained('{run_dir}')"
        if is_lora else
        "import finetune  # registers the architecture (or pass trust_remote_code=True)\nfrom transformers import pipeline\n"
        f"model = pipeline('{pipeline_task}', model='{run_dir}')"
    )
    card = f"""# {recipe.name}

Fine-tuned with [finetune](https://pypi.org/project/finetune) from `{recipe.backbone.name}`
({'pretrained' if recipe.backbone.pretrained else 'randomly initialised'}).

| | |
|---|---|
| task | {recipe.task} |
| head | {recipe.head.type}, pooling {recipe.head.pooling}, dropout {recipe.head.dropout} |
| policy | {recipe.policy.kind}{f" (rank {recipe.policy.lora.rank}, alpha {recipe.policy.lora.alpha})" if is_lora else ""} |
| trainable parameters | {trainable:,} of {total:,} |
| data | `{recipe.data.path}` (max_length {recipe.data.max_length}) |
| training | lr {recipe.train.lr}, batch {recipe.train.batch_size} x {recipe.train.gradient_accumulation_steps}, {recipe.train.max_steps or recipe.train.epochs} {'steps' if recipe.train.max_steps else 'epochs'}, {recipe.train.scheduler} schedule, seed {recipe.train.seed} |
| best step | {metrics.get('best_step')} |

## Validation (best evaluation)

| metric | value |
|---|---|
{table('validation')}

## Test

| metric | value |
|---|---|
{table('test')}

## Load

```python
{load}
```

The full recipe is in `recipe.yaml`.
"""
    atomic_write_text(run_dir / "README.md", card)
