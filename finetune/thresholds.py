"""Per-label thresholds of a finished multi-label run, tuned on its validation split.

    from finetune.thresholds import tune_thresholds
    metrics = tune_thresholds("runs/conll2003_entity_types_minilm-20260101-120000")

Training selects the best evaluation with every label at ``eval.threshold``; afterwards each label gets
the threshold that maximises its own F1 on validation (``finetune.tasks.multi_label.tune_thresholds``).
They are saved with the model, in the ``thresholds`` of each ``config.json`` of the run folder (the model's,
``base/`` for an adapter, ``merged/``), where ``finetune predict`` and ``finetune eval`` read them; validation
and test are scored again with them, in ``metrics.json`` (the scores before, under ``untuned``) and the
model card. Validation chose the thresholds, so its scores are optimistic; test is the honest one.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import torch

from finetune import data as data_lib
from finetune import runs
from finetune.config import RecipeError
from finetune.loop import gathered_outputs
from finetune.metrics import MetricSuite
from finetune.predict import load_run
from finetune.publish import split_rows, write_model_card
from finetune.tasks import TASKS
from finetune.tasks.multi_label import MultiLabelClassification
from finetune.tasks.multi_label import tune_thresholds as best_thresholds


def tune_thresholds(run_dir: str | Path) -> dict:
    """Tune the run's per-label thresholds on validation, save them, score validation and test again.

    Returns the run's metrics as now written to ``metrics.json``.

    Raises:
        RecipeError: not a multi-label run, or its recipe reads no validation split.
        RunFolderError: not a finished run folder.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    recipe, task = run.recipe, TASKS[run.recipe.task]
    if not isinstance(task, MultiLabelClassification):
        raise RecipeError(f"{run_dir}: thresholds are tuned for task=multi_label_classification runs, not {recipe.task}")
    recipe.data.labels = run.labels  # the model's labels, whatever the data holds now
    raw = data_lib.load_splits(recipe.data)
    data_lib.label_names(recipe, raw)
    scored = [split for split in ("validation", "test") if split in raw]
    tokenised = data_lib.tokenize(recipe, datasets.DatasetDict({s: raw[s] for s in scored}), run.tokenizer, run.labels)
    AcceleratorState._reset_state(reset_partial_state=False)  # one fresh state per use, as in finetune.run
    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision)
    collator = data_lib.make_collator(recipe, run.tokenizer, data_lib.pad_multiple(accelerator.device))
    model = accelerator.prepare(run.model)
    suite = MetricSuite(recipe.eval.metrics)
    outputs = {}
    for split in scored:
        loader = accelerator.prepare(data_lib.make_eval_loader(recipe, tokenised[split], collator))
        outputs[split] = gathered_outputs(model, loader, accelerator, recipe, f"scoring {split}")
    logits, gold = outputs["validation"]
    thresholds = best_thresholds(torch.cat(logits).sigmoid(), torch.cat(gold), recipe.eval.threshold)

    metrics = json.loads((run_dir / runs.METRICS).read_text())
    metrics["untuned"] = {split: metrics[split] for split in scored if split in metrics}
    for split in scored:
        loss, predictions, references = task.evaluate(*outputs[split], run.labels, torch.tensor(thresholds))
        metrics[split] = {"loss": loss, **suite.compute(predictions=predictions, references=references)}
    metrics["thresholds"] = dict(zip(run.labels, thresholds))
    if accelerator.is_main_process:
        for folder in (run_dir, run_dir / "base", run_dir / "merged"):
            if (folder / "config.json").is_file():
                _save_thresholds(folder / "config.json", thresholds)
        runs.atomic_write_text(run_dir / runs.METRICS, json.dumps(metrics, indent=2))
        write_model_card(recipe, run_dir, metrics, metrics["trainable_parameters"], metrics["total_parameters"],
                         rows=split_rows(raw), extra=_card_section(metrics))
    run.model.config.thresholds = thresholds
    return metrics


def _save_thresholds(path: Path, thresholds: list[float]) -> None:
    config = json.loads(path.read_text())
    config["thresholds"] = thresholds
    runs.atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _card_section(metrics: dict) -> str:
    tuned = ", ".join(f"{name} {value:.3f}" for name, value in metrics["thresholds"].items())
    before = {split: {k: round(v, 4) for k, v in scores.items()} for split, scores in metrics["untuned"].items()}
    return (f"## Thresholds\n\nTuned per label on validation (each label's F1): {tuned}. The scores above use "
            f"them; validation chose them, so its scores are optimistic. Before tuning: `{json.dumps(before)}`.")
