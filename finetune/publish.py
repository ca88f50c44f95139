"""What leaves a run folder for its users: the exported model (plain or adapter), the tokenizer,
the label map and the model card."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from finetune.config import Recipe
from finetune.modeling import AUTO_MAP
from finetune.runs import atomic_write_text, replace_dir

MODELING_FILE = Path(__file__).with_name("modeling.py")


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
