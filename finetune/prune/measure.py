"""The data and evaluation shared by the before/after measurements of a pruned model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune import data as data_lib
from finetune.config import RecipeConfig
from finetune.inference import (
    compressed_size_bytes,
    latency_ms,
    parameter_counts,
    weights_size_bytes,
)
from finetune.tasks import TASKS

log = logging.getLogger("finetune")
MB = 1024 * 1024


# --- the data and evaluation shared by the before/after measurements ----------------------------


@dataclass
class Bench:
    """A run's recipe and data, tokenised once, with the evaluation set-up used before and after pruning."""
    recipe: RecipeConfig
    labels: list[str] | None
    tokenizer: Any
    tokenised: Any
    """datasets.DatasetDict: validation and test (when the recipe has one)."""
    texts: list
    """Validation inputs (strings, or word lists for token classification), for latency."""
    pairs: list | None
    words: bool
    """The inputs are word lists (token classification)."""
    accelerator: Any
    collator: Any
    metrics: Any


def open_bench(recipe: RecipeConfig, tokenizer, labels: list[str] | None) -> Bench:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from datasets import DatasetDict

    from finetune.metrics import MetricSuite

    raw = data_lib.load_splits(recipe.data)
    data_lib.label_names(recipe, raw)  # every label must be one the model knows
    needed = DatasetDict({split: raw[split] for split in raw if split != "train"})
    tokenised = data_lib.tokenize(recipe, needed, tokenizer, labels)
    AcceleratorState._reset_state(reset_partial_state=False)  # one fresh state per use, as in finetune.loop.Run
    GradientState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=recipe.train.gradient_accumulation_steps,
                              mixed_precision=recipe.train.mixed_precision)
    collator = data_lib.make_collator(recipe, tokenizer, data_lib.pad_multiple(accelerator.device))
    metrics = MetricSuite(recipe.eval.metrics)
    metrics.load()
    task, validation = TASKS[recipe.task], raw["validation"]
    columns = task.input_columns(recipe.data.columns)  # words, or a text and maybe its pair
    texts = validation[columns[0]]
    pairs = validation[columns[1]] if len(columns) > 1 else None
    return Bench(recipe, labels, tokenizer, tokenised, texts, pairs, task.words, accelerator, collator, metrics)


def evaluate_splits(model: nn.Module, bench: Bench) -> dict[str, dict]:
    """Loss and metrics on validation and test, with the training loop's own evaluation."""
    from finetune.loop import evaluate

    accelerator = bench.accelerator
    prepared = accelerator.prepare_model(model, evaluation_mode=True)
    results = {}
    for split in ("validation", "test"):
        if split in bench.tokenised:
            loader = data_lib.make_eval_loader(bench.recipe, bench.tokenised[split], bench.collator)
            results[split] = evaluate(prepared, accelerator.prepare_data_loader(loader), accelerator,
                                      bench.recipe, bench.metrics, bench.labels, f"evaluating {split}")
    # drop a mixed-precision autocast wrapper again: latency and the saved model use the model's own dtype
    accelerator.unwrap_model(prepared, keep_fp32_wrapper=False).eval()
    return results


def measure(model: nn.Module, bench: Bench, folder: Path, repeats: int) -> dict[str, Any]:
    """Parameters, size of the saved weights, and CPU latency at batch 1 and 32 (median of ``repeats``)."""
    model.to("cpu")
    counts = parameter_counts(model)
    max_length = bench.recipe.data.max_length
    return {
        "parameters": counts["total"], "nonzero_parameters": counts["nonzero"],
        "size_mb": round(weights_size_bytes(folder) / MB, 2),
        "compressed_mb": round(compressed_size_bytes(folder) / MB, 2),
        **{f"latency_ms_batch{size}": round(latency_ms(model, bench.tokenizer, bench.texts, size, max_length,
                                                       repeats, pairs=bench.pairs, words=bench.words), 2)
           for size in (1, 32)},
    }


def importance_batches(model: nn.Module, bench: Bench, samples: int) -> list[dict[str, torch.Tensor]]:
    """The first ``samples`` validation examples, batched, on the model's device."""
    validation = bench.tokenised["validation"]
    subset = validation.select(range(min(samples, len(validation))))
    device = next(model.parameters()).device
    loader = data_lib.make_eval_loader(bench.recipe, subset, bench.collator)
    return [{k: v.to(device) for k, v in batch.items()} for batch in loader]


