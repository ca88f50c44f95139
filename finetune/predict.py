"""Use a finished run: load it, predict, evaluate it again on a split."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune import runs
from finetune.config import RecipeConfig, RecipeError
from finetune.errors import RunFolderError


@dataclass
class LoadedRun:
    model: torch.nn.Module
    tokenizer: object
    recipe: RecipeConfig
    labels: list[str] | None
    temperature: float | None = None
    """Single-label classification only: ``predict`` divides the logits by it (``calibration.json``, fitted by
    ``finetune analyze --fit-temperature``); None: none fitted. Ensembles average their members' uncalibrated
    probabilities, and ``evaluate_run`` reports the uncalibrated loss."""


def check_run_folder(run_dir: str | Path, flag: str = "--model") -> RecipeConfig:
    """The recipe of a finished run folder, read before any model loads (a typo fails in a second).

    Raises:
        RunFolderError: the folder is missing or a file, or lacks the recipe, labels or model a finished run has.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{flag}: {run_dir} " + ("is a file, not a run folder" if run_dir.exists() else "does not exist"))
    if (run_dir / runs.MODEL_REMOVED).exists():
        raise RunFolderError(f"{flag}: {run_dir} had its model removed by its sweep (see {run_dir / 'MODEL_REMOVED.txt'})")
    missing = [name for name in (runs.RECIPE, runs.LABEL_MAP) if not (run_dir / name).is_file()]
    if not any(run_dir.glob("*.safetensors")) and not (run_dir / "pytorch_model.bin").is_file():
        missing.append("model weights (*.safetensors)")
    if missing:
        unfinished = (run_dir / runs.CHECKPOINTS).is_dir() and (run_dir / runs.RECIPE).is_file()
        raise RunFolderError(f"{flag}: {run_dir} is not a finished run folder: no {', '.join(missing)}"
                             + ("; training did not finish (continue it with finetune train --resume)" if unfinished else ""))
    with _reading(run_dir / runs.RECIPE):
        return RecipeConfig.from_yaml(run_dir / runs.RECIPE)


@contextmanager
def _reading(file: Path) -> Iterator[None]:
    """A damaged file of a run folder (truncated weights, broken JSON) is named instead of a parser's traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as err:
        from finetune.errors import file_in_traceback

        damaged = file_in_traceback(err, (".safetensors", ".json", ".yaml")) or file  # e.g. tokenizer_config.json
        raise RunFolderError(f"{damaged} is damaged ({type(err).__name__}: {str(err).splitlines()[0]}); "
                             "restore the run folder or train it again") from None
    except OSError as err:
        if err.filename:  # permission denied and the like: the command line names the path itself
            raise
        # transformers says "config file at ... is not a valid JSON file" and the like as a bare OSError
        raise RunFolderError(f"{file.parent}: {str(err).splitlines()[0]}") from None


def load_run(run_dir: str | Path) -> LoadedRun:
    """Load a run folder's best model (plain, adapter or merged) with its tokenizer and recipe.

    Raises:
        RunFolderError: the folder is not a finished run, or one of its files is damaged (named).
    """
    import transformers
    from transformers import AutoTokenizer

    from finetune.modeling import register_auto_classes
    from finetune.tasks import TASKS

    register_auto_classes()  # the Auto classes below load this architecture

    run_dir = Path(run_dir)
    recipe = check_run_folder(run_dir)
    auto_class = getattr(transformers, TASKS[recipe.task].auto_class_name)
    if (run_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        # the base named in adapter_config.json is an absolute path; load the one beside the adapter,
        # so a run folder still loads after it was moved or copied
        with _reading(run_dir / "base"):
            base = auto_class.from_pretrained(str(run_dir / "base"))
        with _reading(run_dir / "adapter_model.safetensors"):
            model = PeftModel.from_pretrained(base, str(run_dir)).eval()
    else:
        with _reading(run_dir / "model.safetensors"):
            model = auto_class.from_pretrained(str(run_dir)).eval()
    with _reading(run_dir / runs.LABEL_MAP):
        label_map = json.loads((run_dir / runs.LABEL_MAP).read_text())
    labels = [label_map[str(i)] for i in range(len(label_map))] or None
    with _reading(run_dir / "tokenizer.json"):
        tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
    return LoadedRun(model, tokenizer, recipe, labels, stored_temperature(run_dir, recipe))


def stored_temperature(run_dir: Path, recipe: RecipeConfig) -> float | None:
    """The temperature in ``calibration.json`` for a single-label classifier, else None (other tasks have no
    softmax to scale: multi-label thresholds are tuned instead).

    Raises:
        RunFolderError: the file is damaged or its temperature is not a positive number.
    """
    file = run_dir / runs.CALIBRATION
    if recipe.task != "classification" or not file.is_file():
        return None
    with _reading(file):
        saved = json.loads(file.read_text())
    temperature = saved.get("temperature") if isinstance(saved, dict) else None
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise RunFolderError(f"{file}: temperature {temperature!r} is not a positive number; fit it again with "
                             f"finetune analyze {run_dir} --fit-temperature, or delete the file")
    return float(temperature)


@torch.no_grad()
def predict(run: LoadedRun, texts: list, pairs: list | None = None, batch_size: int = 64) -> list[dict]:
    """Predict a list of texts (or word lists for token classification).

    Returns one dict per input: ``label`` and ``probabilities`` (classification; divided by the run's
    ``temperature`` when one was fitted), ``score``
    (regression), ``tags`` (token classification), or ``labels`` above their thresholds (the model's
    ``config.thresholds``) and ``probabilities`` (multi-label classification).
    """
    from finetune.tasks import TASKS

    task = TASKS[run.recipe.task]
    thresholds = task.thresholds(run.model.config, run.recipe, run.labels)
    results = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        pair_chunk = pairs[start:start + batch_size] if pairs else None
        enc = run.tokenizer(chunk, pair_chunk, truncation=True, max_length=run.recipe.data.max_length,
                            padding=True, return_tensors="pt", is_split_into_words=task.words)
        logits = run.model(**enc).logits.float()
        if run.temperature is not None and task.name == "classification":
            logits = logits / run.temperature  # calibrated probabilities; the argmax is unchanged
        results += task.predict(logits, enc, chunk, run.labels, thresholds)
    return results


def evaluate_run(run_dir: str | Path, split: str = "test", overrides: list[str] = ()) -> dict:
    """Re-evaluate a run's model on one of its recipe's splits (``data.*`` overrides allowed).

    Raises:
        RecipeError: not a run folder, no such split, or data that doesn't fit the run's labels.
    """
    import datasets
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from finetune import data as data_lib
    from finetune.loop import evaluate
    from finetune.metrics import MetricSuite

    planned = check_run_folder(run_dir).with_overrides(overrides)
    if split == "test" and not planned.data.splits.test:  # before the model and data load
        raise RecipeError("--split test: the run's recipe has no test split (data.splits.test is null); use "
                          "--split validation, or name a test file with data.splits.test=STEM")
    run = load_run(run_dir)
    recipe = run.recipe.with_overrides(overrides)
    if run.labels:
        recipe.data.labels = run.labels  # the model's labels, whatever the new data holds
    raw = data_lib.load_splits(recipe.data)
    if split not in raw:
        raise RecipeError(f"--split: the recipe's data has splits {list(raw)}, not {split!r}")
    data_lib.label_names(recipe, raw)  # every label must be one the model knows
    tokenised = data_lib.tokenize(recipe, datasets.DatasetDict({split: raw[split]}), run.tokenizer, run.labels)
    AcceleratorState._reset_state(reset_partial_state=False)  # see Run: one fresh state per use
    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision)
    collator = data_lib.make_collator(recipe, run.tokenizer, data_lib.pad_multiple(accelerator.device))
    loader = data_lib.make_eval_loader(recipe, tokenised[split], collator)
    model, loader = accelerator.prepare(run.model, loader)
    return evaluate(model, loader, accelerator, recipe, MetricSuite(recipe.eval.metrics), run.labels, split)

