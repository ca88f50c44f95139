"""Baseline for scripts/bench_search.py: AutoGluon ``MultiModalPredictor`` on the same data and backbone.

Runs in its own virtualenv (imports nothing from ``finetune``), CPU only and offline:

    /work/bench/venvs/autogluon/bin/python benchmarks/search/run_autogluon.py \\
        --data DIR --budget 600 --seed 0 --backbone /path/to/minilm --out result.json

DIR holds train.tsv, validation.tsv and test.tsv (header ``sentence<TAB>label``, label ``negative`` or
``positive``). One ``fit`` with ``time_limit`` = the budget and validation as ``tuning_data``; AutoGluon's
own defaults otherwise (its epochs, learning rate and schedule, validation twice an epoch, early stopping,
greedy soup of the top checkpoints). Only these are set: the backbone, 64 tokens, no GPU, batch 32 without
gradient accumulation (as the other tools), data loading in the main process, and no text augmentation
(its default wants NLTK data from the network and, offline, silently swaps the samples it can't augment).
``time_limit`` is Lightning's ``max_time``, counted from the start of training: set-up before it and the
soup after it are outside, so fit takes longer than the budget.

Writes --out (JSON, atomically): tool, seed, budget_s, fit_seconds, validation_accuracy and test_accuracy
(the fitted predictor; validation also chose the checkpoints and the soup), total_seconds (since this
script started, imports included), versions, notes (AutoGluon's fit summary, the settings it resolved,
every validation it logged with the second it happened, how training stopped, the soup).
"""

import time

SCRIPT_START = time.perf_counter()  # before the heavy imports: start-up counts, as on our side

import os

# Before any Hugging Face import, so nothing tries the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import argparse
import csv
import json
import logging
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import autogluon.multimodal
import lightning
import numpy as np
import pandas as pd
import torch
import transformers
from autogluon.multimodal import MultiModalPredictor

LABELS = ["negative", "positive"]
VALIDATION_LINE = re.compile(r"Epoch (\d+), global step (\d+): 'val_accuracy' (?:reached ([\d.]+)|was not in top)")
# Lightning's and AutoGluon's own words for why training stopped and what it did after.
STOP_OR_SOUP = re.compile(r"stopped|Time limit reached|did not improve|Signaling Trainer to stop|soup")


def seconds_since_start() -> float:
    return round(time.perf_counter() - SCRIPT_START, 2)


def read_split(path: Path) -> pd.DataFrame:
    """csv.reader undoes the quoting bench_search's csv.writer may add; labels stay strings.

    Raises:
        ValueError: a label other than ``negative`` / ``positive``.
    """
    with open(path, newline="") as f:
        frame = pd.DataFrame(list(csv.DictReader(f, delimiter="\t")), columns=["sentence", "label"])
    unknown = set(frame["label"]) - set(LABELS)
    if unknown:
        raise ValueError(f"{path}: labels must be {LABELS}, found {sorted(unknown)}")
    return frame


class LogRecorder(logging.Handler):
    """Keeps the log lines that say what training did: AutoGluon reports it only in its log."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.validations: list[dict[str, Any]] = []
        self.stop_and_soup: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        match = VALIDATION_LINE.search(message)
        if match:
            epoch, step, score = match.groups()
            self.validations.append({"t": seconds_since_start(), "epoch": int(epoch), "step": int(step),
                                     "val_accuracy": float(score) if score else None})
        elif STOP_OR_SOUP.search(message):
            self.stop_and_soup.append(message.strip())


def hyperparameters(backbone: str) -> dict[str, Any]:
    return {
        "model.hf_text.checkpoint_name": backbone,
        "model.hf_text.max_text_len": 64,
        "model.hf_text.text_trivial_aug_maxscale": 0.0,
        "env.num_gpus": 0,
        "env.per_gpu_batch_size": 32,
        "env.batch_size": 32,  # default 128 = gradient accumulation over 4 batches of 32
        "env.num_workers": 0,
        "env.num_workers_inference": 0,  # forked loader workers only compete for the cores on CPU
    }


def resolved_settings(predictor: MultiModalPredictor) -> dict[str, Any]:
    """What AutoGluon's defaults came to (read from its config; there is no public accessor)."""
    config = predictor._learner._config
    return {
        "max_epochs": config.optim.max_epochs, "lr": config.optim.lr, "lr_schedule": config.optim.lr_schedule,
        "lr_choice": config.optim.lr_choice, "warmup_steps": config.optim.warmup_steps,
        "weight_decay": config.optim.weight_decay, "patience": config.optim.patience,
        "val_check_interval": config.optim.val_check_interval, "top_k": config.optim.top_k,
        "top_k_average_method": config.optim.top_k_average_method, "batch_size": config.env.batch_size,
        "per_gpu_batch_size": config.env.per_gpu_batch_size, "max_text_len": config.model.hf_text.max_text_len,
    }


def notes(predictor: MultiModalPredictor, log: LogRecorder, train_rows: int) -> dict[str, Any]:
    summary = predictor.fit_summary()
    settings = resolved_settings(predictor)
    steps = max((v["step"] for v in log.validations), default=0)  # Lightning validates once more at a stop
    steps_per_epoch = math.ceil(train_rows / settings["batch_size"])
    return {
        "fit_summary": {key: float(value) for key, value in summary.items()},
        "settings": settings,
        "optimizer_steps": steps,
        "epochs_trained": round(steps / steps_per_epoch, 2),
        "validations": log.validations,
        "stop_and_soup": log.stop_and_soup,
    }


def write_json_atomically(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with train/validation/test.tsv")
    parser.add_argument("--budget", type=float, required=True, help="fit time_limit in wall seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", required=True, help="local folder of the pretrained backbone")
    parser.add_argument("--out", type=Path, required=True)
    cli = parser.parse_args()

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # every core we may use; OMP_NUM_THREADS may say 1
    np.random.seed(cli.seed)
    torch.manual_seed(cli.seed)  # fit(seed=...) seeds everything again before training
    train, validation, test = (read_split(cli.data / f"{name}.tsv") for name in ("train", "validation", "test"))
    log = LogRecorder()
    # AutoGluon and Lightning stop their loggers' propagation, so listen on them directly.
    for name in ("autogluon", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).addHandler(log)

    with tempfile.TemporaryDirectory(prefix="autogluon_") as work_dir:
        predictor = MultiModalPredictor(label="label", problem_type="binary", eval_metric="accuracy",
                                        path=os.path.join(work_dir, "model"))
        fit_started = time.perf_counter()
        predictor.fit(train, tuning_data=validation, time_limit=cli.budget, seed=cli.seed,
                      hyperparameters=hyperparameters(cli.backbone))
        fit_seconds = time.perf_counter() - fit_started
        validation_accuracy = predictor.evaluate(validation, metrics=["accuracy"])["accuracy"]
        test_accuracy = predictor.evaluate(test, metrics=["accuracy"])["accuracy"]
        fit_notes = notes(predictor, log, len(train))

    write_json_atomically(cli.out, {
        "tool": "autogluon", "seed": cli.seed, "budget_s": cli.budget, "fit_seconds": round(fit_seconds, 2),
        "validation_accuracy": float(validation_accuracy), "test_accuracy": float(test_accuracy),
        "total_seconds": seconds_since_start(),
        "versions": {"autogluon.multimodal": autogluon.multimodal.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "lightning": lightning.__version__},
        "notes": fit_notes,
    })
    print(f"autogluon seed {cli.seed}: fit {fit_seconds:.0f} s (time_limit {cli.budget:.0f} s), "
          f"{fit_notes['epochs_trained']} epochs, validation {validation_accuracy:.4f}, test {test_accuracy:.4f}; "
          f"total {seconds_since_start():.0f} s")


if __name__ == "__main__":
    main()
