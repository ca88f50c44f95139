"""Baseline for scripts/bench_search.py: Hugging Face ``Trainer.hyperparameter_search(backend="optuna")``.

Runs in its own virtualenv (imports nothing from ``finetune``), CPU only and offline:

    /work/bench/venvs/trainer-hpo/bin/python benchmarks/search/run_trainer_hpo.py \\
        --data DIR --budget 600 --seed 0 --backbone /path/to/minilm --out result.json

DIR holds train.tsv, validation.tsv and test.tsv (header ``sentence<TAB>label``, label ``negative`` or
``positive``). The search is TPE (``TPESampler(seed)``), at most 200 trials, ``timeout`` = the budget, over
the space our sweeps use: learning rate log-uniform 1e-5..1e-3, epochs 1..3, warm-up ratio 0 or 0.1 (passed
as ``warmup_steps``: transformers 5 has no ``warmup_ratio``) and policy full / LoRA rank 8 / LoRA rank 32
(peft, alpha = 2 x rank, on query, key, value, dense). Each trial builds a fresh
``AutoModelForSequenceClassification`` and is evaluated on validation every epoch; its value is its last
evaluation. Optuna's default pruner (median) stays on, as a user of this API gets it. Optuna checks the
timeout only between trials, so the trial running at the budget finishes. The Trainer keeps no model, so
the best settings are then trained again from scratch (same seed) and scored on validation and test.

Writes --out (JSON, atomically): tool, seed, budget_s, timeline (every evaluation: t = seconds since this
script started, trial, step, max_steps, warmup_steps, validation, params), trials (trial, state, params,
validation = its value or None when pruned, as a pruned trial can't be chosen, last_validation,
finished_t), search_seconds, best_params, best_search_validation, retrain_seconds, validation_accuracy and
test_accuracy (of the retrained model), total_seconds, versions.
"""

import time

SCRIPT_START = time.perf_counter()  # before the heavy imports: start-up counts, as on our side

import os

# Before transformers / huggingface_hub / datasets are imported, so nothing tries the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import argparse
import csv
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import peft
import torch
import transformers
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import BestRun

LABELS = ["negative", "positive"]
MAX_LENGTH = 64
N_TRIALS = 200
POLICIES = ["full", "lora-8", "lora-32"]
LORA_TARGETS = ["query", "key", "value", "dense"]


def seconds_since_start() -> float:
    return round(time.perf_counter() - SCRIPT_START, 2)


def read_split(path: Path) -> dict[str, list]:
    """Sentences and 0/1 labels; csv.reader undoes the quoting bench_search's csv.writer may add.

    Raises:
        ValueError: a label other than ``negative`` / ``positive``.
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    unknown = {row["label"] for row in rows} - set(LABELS)
    if unknown:
        raise ValueError(f"{path}: labels must be {LABELS}, found {sorted(unknown)}")
    return {"sentence": [row["sentence"] for row in rows], "label": [LABELS.index(row["label"]) for row in rows]}


def tokenize(split: dict[str, list], tokenizer: PreTrainedTokenizerBase) -> Dataset:
    # No padding here: DataCollatorWithPadding pads each batch to its longest row.
    dataset = Dataset.from_dict(split).map(
        lambda batch: tokenizer(batch["sentence"], truncation=True, max_length=MAX_LENGTH), batched=True
    )
    return dataset.remove_columns("sentence").rename_column("label", "labels")


def hp_space(trial: optuna.Trial) -> dict[str, Any]:
    """The search space; only TrainingArguments fields are returned (``policy`` is read by model_init)."""
    trial.suggest_categorical("policy", POLICIES)
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True),
        "num_train_epochs": trial.suggest_int("num_train_epochs", 1, 3),
        # transformers 5 has no warmup_ratio field: a float in [0, 1) in warmup_steps is the ratio.
        "warmup_steps": trial.suggest_categorical("warmup_ratio", [0.0, 0.1]),
    }


def build_model(backbone: str, policy: str) -> torch.nn.Module:
    """A fresh classifier; for ``lora-<rank>`` wrapped by peft (SEQ_CLS keeps the classifier trainable)."""
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=2)
    if policy == "full":
        return model
    rank = int(policy.removeprefix("lora-"))
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=rank, lora_alpha=2 * rank, lora_dropout=0.1,
                             target_modules=LORA_TARGETS)
    return peft.get_peft_model(model, config)


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


class Recorder(TrainerCallback):
    """Every evaluation of every trial (the timeline) and when each trial ended (also when pruned)."""

    def __init__(self) -> None:
        self.timeline: list[dict[str, Any]] = []
        self.finished_t: dict[int, float] = {}
        self.last_validation: dict[int, float] = {}

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        if state.trial_name is None or metrics is None:
            return
        trial = int(state.trial_name)
        self.last_validation[trial] = metrics["eval_accuracy"]
        self.timeline.append({"t": seconds_since_start(), "trial": trial, "step": state.global_step,
                              "max_steps": state.max_steps, "validation": metrics["eval_accuracy"],
                              "warmup_steps": args.get_warmup_steps(state.max_steps),
                              "params": dict(state.trial_params or {})})

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        # Called on completion and, by Trainer, just before it raises TrialPruned.
        if state.trial_name is not None:
            self.finished_t[int(state.trial_name)] = seconds_since_start()


def training_arguments(output_dir: str, seed: int, **overrides: Any) -> TrainingArguments:
    fixed = dict(
        output_dir=output_dir, per_device_train_batch_size=32, per_device_eval_batch_size=64, weight_decay=0.01,
        lr_scheduler_type="linear", eval_strategy="epoch", save_strategy="no", logging_strategy="no",
        report_to=[], use_cpu=True, seed=seed, dataloader_num_workers=0, disable_tqdm=True,
        # A float default: the search casts each value to the default's type, and int(0.1) would be 0.
        warmup_steps=0.0,
    )
    return TrainingArguments(**{**fixed, **overrides})


def search(train: Dataset, validation: Dataset, tokenizer: PreTrainedTokenizerBase, backbone: str, seed: int,
           budget: float, work_dir: str) -> tuple[BestRun, optuna.Study, Recorder]:
    """Trainer.hyperparameter_search as documented; the study is read back from our own in-memory storage."""

    def model_init(trial: optuna.Trial | None) -> torch.nn.Module:
        # Trainer calls model_init *before* it applies hp_space to the trial, so trial.params is still empty
        # here: run hp_space first (optuna returns the same values when Trainer asks again).
        if trial is None:  # Trainer.__init__ builds one model before any trial
            return build_model(backbone, "full")
        hp_space(trial)
        return build_model(backbone, trial.params["policy"])

    recorder = Recorder()
    trainer = Trainer(
        model_init=model_init, args=training_arguments(work_dir, seed), train_dataset=train,
        eval_dataset=validation, processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy, callbacks=[recorder],
    )
    storage = optuna.storages.InMemoryStorage()
    study_name = f"trainer-hpo-seed{seed}"
    # Optuna's Study.optimize checks timeout only before starting a trial: the running one always finishes.
    best = trainer.hyperparameter_search(
        hp_space=hp_space, compute_objective=lambda metrics: metrics["eval_accuracy"], n_trials=N_TRIALS,
        direction="maximize", backend="optuna", hp_name=lambda trial: str(trial.number),
        timeout=budget, sampler=optuna.samplers.TPESampler(seed=seed), storage=storage, study_name=study_name,
    )
    return best, optuna.load_study(study_name=study_name, storage=storage), recorder


def trial_rows(study: optuna.Study, recorder: Recorder) -> list[dict[str, Any]]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        complete = trial.state == optuna.trial.TrialState.COMPLETE
        rows.append({"trial": trial.number, "state": trial.state.name, "params": trial.params,
                     "validation": trial.value if complete else None,
                     "last_validation": recorder.last_validation.get(trial.number),
                     "finished_t": recorder.finished_t.get(trial.number)})
    return rows


def retrain(params: dict[str, Any], train: Dataset, validation: Dataset, test: Dataset,
            tokenizer: PreTrainedTokenizerBase, backbone: str, seed: int, work_dir: str) -> dict[str, float]:
    """The best settings trained from scratch with the same seed; one evaluation per split at the end."""
    started = time.perf_counter()
    # No evaluation while training: the search already saw this curve; only the end counts.
    args = training_arguments(work_dir, seed, learning_rate=params["learning_rate"], eval_strategy="no",
                              num_train_epochs=params["num_train_epochs"],
                              warmup_steps=float(params["warmup_ratio"]))
    trainer = Trainer(
        model_init=lambda: build_model(backbone, params["policy"]), args=args, train_dataset=train,
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
    )
    trainer.train()
    retrain_seconds = time.perf_counter() - started
    return {"retrain_seconds": round(retrain_seconds, 2),
            "validation_accuracy": trainer.evaluate(validation)["eval_accuracy"],
            "test_accuracy": trainer.evaluate(test)["eval_accuracy"]}


def write_json_atomically(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with train/validation/test.tsv")
    parser.add_argument("--budget", type=float, required=True, help="search timeout in wall seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", required=True, help="local folder of the pretrained backbone")
    parser.add_argument("--out", type=Path, required=True)
    cli = parser.parse_args()

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # every core we may use; OMP_NUM_THREADS may say 1
    set_seed(cli.seed)
    tokenizer = AutoTokenizer.from_pretrained(cli.backbone)
    train, validation, test = (tokenize(read_split(cli.data / f"{name}.tsv"), tokenizer)
                               for name in ("train", "validation", "test"))
    with tempfile.TemporaryDirectory(prefix="trainer_hpo_") as work_dir:
        search_started = time.perf_counter()
        best, study, recorder = search(train, validation, tokenizer, cli.backbone, cli.seed, cli.budget, work_dir)
        search_seconds = time.perf_counter() - search_started
        final = retrain(best.hyperparameters, train, validation, test, tokenizer, cli.backbone, cli.seed, work_dir)

    trials = trial_rows(study, recorder)
    write_json_atomically(cli.out, {
        "tool": "trainer_hpo", "seed": cli.seed, "budget_s": cli.budget, "timeline": recorder.timeline,
        "trials": trials, "search_seconds": round(search_seconds, 2), "best_params": best.hyperparameters,
        "best_search_validation": best.objective, **final, "total_seconds": seconds_since_start(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "optuna": optuna.__version__, "peft": peft.__version__},
    })
    print(f"trainer_hpo seed {cli.seed}: {len(trials)} trials in {search_seconds:.0f} s, best {best.hyperparameters} "
          f"(search validation {best.objective:.4f}); retrained in {final['retrain_seconds']:.0f} s: validation "
          f"{final['validation_accuracy']:.4f}, test {final['test_accuracy']:.4f}; total {seconds_since_start():.0f} s")


if __name__ == "__main__":
    main()
