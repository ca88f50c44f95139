"""Use a finished run: load it, predict, evaluate it again on a split."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.config import Recipe, RecipeError


@dataclass
class LoadedRun:
    model: torch.nn.Module
    tokenizer: object
    recipe: Recipe
    labels: list[str] | None


def load_run(run_dir: str | Path) -> LoadedRun:
    """Load a run folder's best model (plain, adapter or merged) with its tokenizer and recipe.

    Raises:
        RecipeError: the folder is not a finished run.
    """
    import finetune  # noqa: F401  registers the architecture with the Auto classes
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file() or not (run_dir / "label_map.json").is_file():
        raise RecipeError(f"--model: {run_dir} is not a finished run folder (no recipe.yaml / label_map.json)")
    recipe = Recipe.from_yaml(run_dir / "recipe.yaml")
    token_task = recipe.task == "token_classification"
    auto_class = AutoModelForTokenClassification if token_task else AutoModelForSequenceClassification
    if (run_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        # the base named in adapter_config.json is an absolute path; load the one beside the adapter,
        # so a run folder still loads after it was moved or copied
        base = auto_class.from_pretrained(str(run_dir / "base"))
        model = PeftModel.from_pretrained(base, str(run_dir)).eval()
    else:
        model = auto_class.from_pretrained(str(run_dir)).eval()
    label_map = json.loads((run_dir / "label_map.json").read_text())
    labels = [label_map[str(i)] for i in range(len(label_map))] or None
    return LoadedRun(model, AutoTokenizer.from_pretrained(str(run_dir)), recipe, labels)


@torch.no_grad()
def predict(run: LoadedRun, texts: list, pairs: list | None = None, batch_size: int = 64) -> list[dict]:
    """Predict a list of texts (or word lists for token classification).

    Returns one dict per input: ``label`` and ``probabilities`` (classification), ``score``
    (regression) or ``tags`` (token classification).
    """
    results = []
    token_task = run.recipe.task == "token_classification"
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        pair_chunk = pairs[start:start + batch_size] if pairs else None
        enc = run.tokenizer(chunk, pair_chunk, truncation=True, max_length=run.recipe.data.max_length,
                            padding=True, return_tensors="pt", is_split_into_words=token_task)
        logits = run.model(**enc).logits.float()
        for i in range(len(chunk)):
            if token_task:
                words, tags, previous = enc.word_ids(i), [], None
                for position, word in enumerate(words):
                    if word is not None and word != previous:
                        tags.append(run.labels[int(logits[i, position].argmax())])
                    previous = word
                results.append({"tokens": chunk[i][:len(tags)], "tags": tags})
            elif run.labels is None:
                results.append({"score": float(logits[i, 0])})
            else:
                probs = logits[i].softmax(-1)
                results.append({"label": run.labels[int(probs.argmax())],
                                "probabilities": {name: round(float(p), 6) for name, p in zip(run.labels, probs)}})
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

