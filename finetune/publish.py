"""What leaves a run folder for its users: the exported model (plain or adapter), the tokenizer,
the label map and the model card.

Everything here is written into a temporary folder, flushed to disk with the folder's usual file
mode (``finetune.runs.settle``) and only then moved into place, so a crash never publishes a
half-written file.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune import runs
from finetune.config import RecipeConfig
from finetune.modeling import AUTO_MAP
from finetune.policies import plain, policy_of
from finetune.runs import atomic_write_text, publish_files, replace_dir
from finetune.tasks import TASKS

MODELING_FILE = Path(__file__).with_name("modeling.py")
SUBSAMPLE_KEYS = {"train": "max_train_samples", "validation": "max_eval_samples", "test": "max_test_samples"}


# --- files ---------------------------------------------------------------------------------


def _save_plain(model, folder: Path) -> None:
    model.config.auto_map = AUTO_MAP
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copyfile(MODELING_FILE, folder / "modeling_finetune.py")


def _save_tokenizer(tokenizer, folder: Path, max_length: int | None) -> None:
    """The tokenizer, saying the length the model was trained at: ``model_max_length`` is what
    ``truncation=True`` and the token-classification pipeline cut at."""
    tokenizer.save_pretrained(folder)
    if max_length is None:
        return
    path = folder / "tokenizer_config.json"
    settings = json.loads(path.read_text())
    settings["model_max_length"] = max_length
    if "max_length" in settings:  # a default carried over from the backbone's files would contradict it
        settings["max_length"] = max_length
    atomic_write_text(path, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def save_base(model, run_dir: Path) -> None:
    """Adapter runs (lora, dora, ia3): the untouched model the adapter applies to, so peft can load the run."""
    tmp = run_dir / ".base.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted save
    _save_plain(model, tmp)
    replace_dir(tmp, run_dir / "base")  # flushed and given the folder's usual mode first


def export_model(model, tokenizer, labels: list[str] | None, run_dir: Path, merge_lora: bool, *,
                 max_length: int | None = None) -> None:
    """Write the model (plain or adapter), tokenizer and label map into the run folder.

    ``max_length`` (the recipe's ``data.max_length``) becomes the saved tokenizer's
    ``model_max_length``; None keeps the backbone's.
    """
    from peft import PeftModel

    tmp = run_dir / ".model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    if isinstance(model, PeftModel):
        model.save_pretrained(tmp, safe_serialization=True)
        adapter_cfg = json.loads((tmp / "adapter_config.json").read_text())
        # Absolute on purpose: peft hands base_model_name_or_path to from_pretrained unchanged, which
        # resolves a relative path against the current directory (then the hub), never against the
        # adapter's folder. The model card gives the line that loads a moved run.
        adapter_cfg["base_model_name_or_path"] = str((run_dir / "base").resolve())
        atomic_write_text(tmp / "adapter_config.json", json.dumps(adapter_cfg, indent=2) + "\n")
        if (run_dir / "base").is_dir():
            # transformers' pipeline(model=RUN) loads the base named above and its tokenizer from there
            base_tokenizer = run_dir / ".base-tokenizer.tmp"
            if base_tokenizer.exists():
                shutil.rmtree(base_tokenizer)
            _save_tokenizer(tokenizer, base_tokenizer, max_length)
            publish_files(base_tokenizer, run_dir / "base")
        if merge_lora:
            merged = run_dir / ".merged.tmp"
            if merged.exists():
                shutil.rmtree(merged)
            _save_plain(plain(copy.deepcopy(model))[0], merged)
            _save_tokenizer(tokenizer, merged, max_length)
            replace_dir(merged, run_dir / "merged")
    else:
        _save_plain(model, tmp)
    _save_tokenizer(tokenizer, tmp, max_length)
    label_map = {str(i): name for i, name in enumerate(labels)} if labels else {}
    atomic_write_text(tmp / runs.LABEL_MAP, json.dumps(label_map, indent=2) + "\n")
    publish_files(tmp, run_dir)


# --- model card ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitRows:
    """What one split held in a run, for the model card."""
    rows: int
    """Rows used (after drops and any subsample)."""
    before_subsample: int | None = None
    """Rows the split held before a subsample (equal to ``rows`` when none was taken); None: not known."""
    dropped: Mapping[str, int] = field(default_factory=dict)
    """Rows a ``data.on_<reason>: drop`` policy removed, by reason."""


def split_rows(raw: Mapping[str, Any]) -> dict[str, SplitRows]:
    """Row counts of loaded splits (``finetune.data.load_splits``), from what each split remembers
    of its origin: how many rows a subsample was drawn from and how many were dropped."""
    from finetune.ingest import origin_of

    counts = {}
    for split, ds in raw.items():
        origin = origin_of(ds)
        if origin is None:  # in-memory data: its size is all that is known
            counts[split] = SplitRows(len(ds))
        else:
            counts[split] = SplitRows(len(ds), origin.subsampled_from or len(ds), dict(origin.dropped))
    return counts


def _hub_id(name: str) -> str | None:
    """``name`` if it names a hub repository rather than a folder on this machine (the rule data and
    backbones are located by)."""
    from finetune.sources import HUB_ID, expand_path

    return name if HUB_ID.fullmatch(name) and not Path(expand_path(name)).exists() else None


def _numbers(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _split_name(recipe: RecipeConfig, split: str) -> str:
    """Where a role's rows come from, e.g. "test (`test`)"."""
    splits = recipe.data.splits
    if split == "validation" and splits.validation_from_train is not None:
        by = ", whole texts" if splits.validation_by == "whole_text" else ""
        return (f"validation (carved from `{splits.train}`, data.splits.validation_from_train="
                f"{splits.validation_from_train}{by})")
    if split == "train" and splits.validation_from_train is not None:
        inside = " and the rows inside its texts" if splits.validation_by == "whole_text" else ""
        return f"train (`{splits.train}` less the validation carve-out{inside})"
    return f"{split} (`{getattr(splits, split)}`)"


def _rows_text(recipe: RecipeConfig, split: str, counted: SplitRows | None) -> str:
    """How many rows a split had and whether they were a subsample, as the data loader chose them:
    a split is subsampled exactly when its ``data.max_*_samples`` is below its size."""
    key = SUBSAMPLE_KEYS[split]
    limit = getattr(recipe.data, key)
    seed = recipe.data.subsample_seed
    if counted is None:  # the caller didn't count: say what the recipe allows, no more
        if limit is None:
            return "every row of the split"
        return f"a seeded subsample of at most {limit:,} rows (data.{key}={limit}, data.subsample_seed={seed})"
    rows, before = counted.rows, counted.before_subsample
    if before is not None and rows < before:
        text = f"{rows:,} rows, a seeded subsample of {before:,} (data.{key}={limit}, data.subsample_seed={seed})"
    elif before is None and limit is not None and rows == limit:
        text = f"{rows:,} rows (data.{key}={limit}: a seeded subsample if the split holds more)"
    else:
        text = f"{rows:,} rows, no subsample"
    dropped = [f"; {n:,} row(s) with {reason.replace('_', ' ')} dropped (data.on_{reason}: drop)"
               for reason, n in counted.dropped.items() if n]
    return text + "".join(dropped)


def _data_source(recipe: RecipeConfig) -> tuple[str, str | None]:
    """Where the data was read from, with ${VARS} expanded, and its hub id if it has one."""
    from finetune.sources import describe

    cfg = recipe.data
    source = f"`{describe(cfg)}`"
    if "$" in cfg.path or cfg.path.startswith("~"):
        source += f" (recipe: `{cfg.path}`)"
    return source, _hub_id(cfg.path)


def _header(recipe: RecipeConfig, metrics: Mapping[str, Any], data_hub: str | None, pipeline_task: str) -> str:
    """Hugging Face metadata: what the hub shows and filters on."""
    from finetune.sources import expand_path

    adapter = policy_of(recipe).adapter
    meta: dict[str, Any] = {
        "library_name": "peft" if adapter else "transformers",
        "pipeline_tag": pipeline_task,
        "tags": ["finetune", recipe.task.replace("_", "-"), f"policy-{recipe.policy.kind.replace('_', '-')}"]
        + ([recipe.policy.kind] if adapter else []),
    }
    base = _hub_id(recipe.backbone.name)
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "adapter" if adapter else "finetune"
    if data_hub:
        meta["datasets"] = [data_hub]
    scored = ["validation"] + (["test"] if recipe.data.splits.test else [])
    splits = [s for s in scored if _numbers(metrics.get(s))]
    names = list(dict.fromkeys(k for s in splits for k in _numbers(metrics.get(s))))
    if names:
        meta["metrics"] = names
        dataset = {"name": data_hub or Path(expand_path(recipe.data.path)).name, "type": data_hub or "local"}
        if recipe.data.name:
            dataset["config"] = recipe.data.name
        meta["model-index"] = [{"name": recipe.name, "results": [
            {"task": {"type": pipeline_task},
             "dataset": {**dataset, "split": getattr(recipe.data.splits, split) or split},
             "metrics": [{"type": k, "value": round(float(v), 6), "name": f"{split} {k}"}
                         for k, v in _numbers(metrics.get(split)).items()]}
            for split in splits]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _load_snippet(recipe: RecipeConfig, pipeline_task: str, merged: bool) -> str:
    task = TASKS[recipe.task]
    kind = task.auto_class_name.removeprefix("AutoModelFor")
    # the token-classification pipeline truncates at model_max_length by itself; text-classification
    # truncates only when asked, and transformers offers no saved setting that turns it on
    truncation = ("" if task.words else ", truncation=True") + task.pipeline_options
    example = "classify({'text': 'first text', 'text_pair': 'second text'})" if recipe.data.columns.text_pair \
        else ("classify('Paris is lovely')" if task.words else "classify('a sentence to classify')")
    folder = "Run this from this folder, or replace `\".\"` with the folder's path"
    policy = policy_of(recipe)
    if not policy.adapter:
        return f"""```python
import finetune  # registers the architecture (or pass trust_remote_code=True)
from transformers import pipeline
classify = pipeline("{pipeline_task}", model="."{truncation})
{example}
```

{folder}."""
    also = (f'`AutoPeftModelFor{kind}.from_pretrained(".")` and `pipeline("{pipeline_task}", model="."{truncation})`'
            f"\nwork" if policy.transformers_loads else f'`AutoPeftModelFor{kind}.from_pretrained(".")` works')
    text = f"""```python
import finetune  # registers the architecture
from transformers import AutoModelFor{kind}, AutoTokenizer
from peft import PeftModel
model = PeftModel.from_pretrained(AutoModelFor{kind}.from_pretrained("base"), ".")
tokenizer = AutoTokenizer.from_pretrained(".")  # call it with truncation=True
```

{folder} (and `"base"` with its `base/`). This works wherever the folder is.
{also} too, but only until the folder is moved: `adapter_config.json` names `base/` by its absolute path,
because peft resolves `base_model_name_or_path` against the current directory or the hub, never against
the adapter's folder."""
    if not policy.transformers_loads:
        text += f"""

`pipeline("{pipeline_task}", model=".")` does not load this adapter whole (transformers' own adapter loader
leaves some trained {recipe.policy.kind} weights at their initial values); give it the model loaded above:
`pipeline("{pipeline_task}", model=model, tokenizer=tokenizer{truncation})`."""
    if merged:
        text += f"""

`merged/` holds the adapter merged into one plain model, loadable anywhere:
`pipeline("{pipeline_task}", model="merged"{truncation})`."""
    return text


def write_model_card(recipe: RecipeConfig, run_dir: Path, metrics: dict[str, Any], trainable: int, total: int, *,
                     rows: Mapping[str, SplitRows] | None = None, extra: str = "") -> None:
    """README.md: Hugging Face metadata, what was trained on what, the scores with the rows they
    were computed on, and how to load the model.

    ``rows``: what each split held in this run (see ``split_rows``); without it the card says only
    what the recipe allows.
    ``extra``: markdown appended at the end (e.g. a pruning report).
    """
    policy = policy_of(recipe)
    detail = policy.describe(recipe)
    task = TASKS[recipe.task]
    pipeline_task = task.pipeline_task
    source, data_hub = _data_source(recipe)
    rows = rows or {}
    max_length = recipe.data.max_length

    def table(split: str) -> str:
        values = _numbers(metrics.get(split))
        lines = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in values.items())
        return f"| metric | value |\n|---|---|\n{lines}"

    def split_line(split: str) -> str:
        return f"- {_split_name(recipe, split)}: {_rows_text(recipe, split, rows.get(split))}"

    splits = "\n".join(split_line(s) for s in ("train", "validation", "test") if s != "test" or recipe.data.splits.test)
    pipeline_note = "" if task.words else (
        " The text-classification pipeline truncates only when passed `truncation=True` (transformers has no saved"
        " setting for it); without it, longer inputs are read whole and scored unlike in training.")
    pipeline_note += f" {task.card_note}" if task.card_note else ""
    report = " What was read, dropped and truncated is in `data_report.json`." \
        if (run_dir / runs.DATA_REPORT).is_file() else ""
    if recipe.data.splits.test and _numbers(metrics.get("test")):
        test = (f"Scored once, with the exported weights. Test split: "
                f"{_rows_text(recipe, 'test', rows.get('test'))}.\n\n{table('test')}")
    elif recipe.data.splits.test:
        test = "No test score was recorded."
    else:
        test = "No test split (`data.splits.test` is null): there is no held-out score."
    card = f"""{_header(recipe, metrics, data_hub, pipeline_task)}
# {recipe.name}

Fine-tuned with finetune (this project) from `{recipe.backbone.name}`
({'pretrained' if recipe.backbone.pretrained else 'randomly initialised'}).

| | |
|---|---|
| task | {recipe.task} |
| head | {recipe.head.type}, pooling {recipe.head.pooling}, dropout {recipe.head.dropout} |
| policy | {recipe.policy.kind}{f" ({detail})" if detail else ""} |
| trainable parameters | {trainable:,} of {total:,} |
| data | {source} |
| truncation | {max_length} tokens (`data.max_length`) |
| training | lr {recipe.train.lr}, batch {recipe.train.batch_size} x {recipe.train.gradient_accumulation_steps}, {recipe.train.max_steps or recipe.train.epochs} {'steps' if recipe.train.max_steps else 'epochs'}, {recipe.train.scheduler} schedule, seed {recipe.train.seed} |
| best step | {metrics.get('best_step')} |

## Data

{splits}

Every input was cut to {max_length} tokens, in training and evaluation alike; the saved tokenizer's
`model_max_length` is {max_length}, so `truncation=True` cuts where the model was trained to read.{pipeline_note}{report}

## Validation (best evaluation)

The evaluation that chose the exported weights, so its score is optimistic. Validation split:
{_rows_text(recipe, 'validation', rows.get('validation'))}.

{table('validation')}

## Test

{test}

## Load

{_load_snippet(recipe, pipeline_task, merged=policy.adapter and (run_dir / "merged").is_dir())}

`finetune predict --model . --input FILE` gives the same predictions. The full recipe is in `recipe.yaml`.
"""
    if extra:
        card += "\n" + extra.strip("\n") + "\n"
    atomic_write_text(run_dir / "README.md", card)
