"""A model's outputs on one split: ``collect(RUN_OR_ENSEMBLE, "test")`` reads the split through the model's
recipe (its data section, the model's labels), runs the model in batches and returns ``SplitOutputs``.

A run's probabilities are what ``finetune predict`` gives (its stored temperature applied, unless
``apply_temperature=False``); an ensemble's are its members' weighted mean, its predictions the ensemble's
(mean argmax or vote). Token classification is read per word, at each word's first sub-word, as the
training labels are (``tasks/token_classification.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from finetune.analysis.outputs import SplitOutputs
from finetune.config import RecipeConfig, RecipeError
from finetune.errors import DataError
from finetune.ingest import label_text, where
from finetune.progress import bar
from finetune.tasks import TASKS

log = logging.getLogger("finetune.analysis")
SPLITS = ("train", "validation", "test")


def model_recipe(model_path: str | Path, flag: str = "analyze") -> RecipeConfig:
    """The recipe of a run or ensemble folder, read in a second, before any model loads.

    Raises:
        RunFolderError: not a finished run folder (or an ensemble folder); named, with why.
    """
    from finetune.ensemble import ARTEFACT, is_ensemble
    from finetune.predict import check_run_folder

    path = Path(model_path)
    if is_ensemble(path):
        try:
            return RecipeConfig.from_dict(json.loads((path / ARTEFACT).read_text())["recipe"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise RecipeError(f"{flag}: {path / ARTEFACT} is damaged ({type(err).__name__}: {err})") from None
    return check_run_folder(path, flag)


def check_split(recipe: RecipeConfig, split: str, flag: str = "--split") -> None:
    """A split the recipe reads (before any data or model loads).

    Raises:
        RecipeError: an unknown split name, or test for a recipe without a test split.
    """
    if split not in SPLITS:
        raise RecipeError(f"{flag} {split!r}: expected one of {', '.join(SPLITS)}")
    if split == "test" and not recipe.data.splits.test:
        raise RecipeError(f"{flag} test: the recipe has no test split (data.splits.test is null); use --split "
                          "validation, or name a test file with data.splits.test=STEM")


def collect(model_path: str | Path, split: str = "test", overrides: Sequence[str] = (), *,
            columns: Sequence[str] = (), apply_temperature: bool = True, same_rows_as: SplitOutputs | None = None,
            batch_size: int = 64) -> SplitOutputs:
    """A run's or an ensemble's outputs on one split of its recipe's data (``data.*`` overrides allowed).

    ``columns``: the split must have these (``--slice``), checked before the model runs.
    ``same_rows_as``: use these rows (inputs, gold, columns) instead of loading the split, e.g. run B of a
    comparison on run A's split; the models must share task and label set (B's columns are put in A's order).

    Raises:
        RecipeError: not a run or ensemble folder, an override outside data.*, no such split, a column
            missing, a label the model doesn't know (file and line named), or (``same_rows_as``) another
            task or label set.
    """
    from finetune.ensemble import Ensemble, is_ensemble
    from finetune.predict import load_run

    bad = [o for o in overrides if not o.partition("=")[0].strip().startswith("data.")]
    if bad:
        raise RecipeError(f"analyze overrides change the data that is read (data.*), not {bad[0]!r}")
    recipe = model_recipe(model_path).with_overrides(list(overrides))
    ensemble = is_ensemble(model_path)
    if same_rows_as is not None:
        _check_same_kind(recipe, same_rows_as, model_path)
        rows = dataclasses.replace(same_rows_as, model=str(model_path), predicted=None, probabilities=None,
                                   thresholds=None, temperature=None)
    else:
        check_split(recipe, split)
        labels = _model_labels(model_path, ensemble)
        rows = _read_split(recipe, labels, split, model_path)
        missing = [c for c in columns if c not in rows.columns]
        if missing:
            raise RecipeError(f"--slice {missing[0]}: split {split!r} has no such column; its other columns are "
                              f"{sorted(rows.columns) or 'none'}")
    log.info("%s: %d rows of %s", model_path, len(rows), split)
    if ensemble:
        model = Ensemble.load(model_path)
        _check_labels(model.labels, rows.labels, model_path)
        return _ensemble_outputs(model, rows, batch_size)
    run = load_run(model_path)
    _check_labels(run.labels, rows.labels, model_path)
    if overrides:
        run.recipe = run.recipe.with_overrides(list(overrides))  # e.g. data.max_length
    temperature = run.temperature if apply_temperature else None
    return _run_outputs(run, rows, temperature, batch_size)


def _model_labels(model_path: str | Path, ensemble: bool) -> list[str] | None:
    """The model's labels in id order, from its label map (an ensemble: its saved labels), before it loads."""
    path = Path(model_path)
    if ensemble:
        return json.loads((path / "ensemble.json").read_text()).get("labels")
    from finetune import runs

    label_map = json.loads((path / runs.LABEL_MAP).read_text())
    return [label_map[str(i)] for i in range(len(label_map))] or None


def _read_split(recipe: RecipeConfig, labels: list[str] | None, split: str, model_path) -> SplitOutputs:
    """The split's rows with gold label ids (the model's labels), its inputs and other columns."""
    import datasets

    from finetune import data as data_lib
    from finetune.data_config import SplitsConfig
    from finetune.tasks.base import require_columns

    recipe = recipe.model_copy(deep=True)
    splits, task, cols = recipe.data.splits, TASKS[recipe.task], recipe.data.columns
    if labels:
        recipe.data.labels = labels
    if split != "train" and not (split == "validation" and splits.validation_from_train is not None):
        # the split alone is read (the training file may be large): every role reads it
        name = splits.named()[split]
        recipe.data.splits = SplitsConfig(train=name, validation=name, test=splits.test)
    ds = data_lib.load_splits(recipe.data)[split]
    inputs = task.input_columns(cols)
    label_column = task.label_column(cols)
    require_columns(datasets.DatasetDict({split: ds}), [*inputs, label_column])
    label_id = {name: i for i, name in enumerate(labels or [])}
    gold = []
    for row, value in enumerate(ds[label_column]):
        try:
            gold.append(_gold(task, value, label_id, recipe))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where(ds, split, row)}: label {value!r:.60} in column {label_column!r} is not one "
                            f"the model {model_path} knows ({labels})") from None
    used = {*inputs, label_column}
    return SplitOutputs(
        task=recipe.task, split=split, model=str(model_path), texts=list(ds[inputs[0]]),
        pairs=list(ds[inputs[1]]) if len(inputs) > 1 else None, labels=labels,
        gold=gold if task.words else np.asarray(gold, dtype=np.int64 if task.classes else np.float64), predicted=None,
        columns={name: list(ds[name]) for name in ds.column_names if name not in used})


def _gold(task, value, label_id: dict[str, int], recipe: RecipeConfig):
    if task.words:
        return np.array([label_id[label_text(tag)] for tag in value], dtype=np.int64)
    if not task.classes:
        return float(value)
    return task.encode_label(value, label_id, recipe.data)  # an id, or a multi-hot list (multi-label)


def _check_same_kind(recipe: RecipeConfig, rows: SplitOutputs, model_path) -> None:
    if recipe.task != rows.task:
        raise RecipeError(f"--compare: {model_path} is a {recipe.task} model, {rows.model} a {rows.task} one")
    pairs = bool(recipe.data.columns.text_pair)
    if pairs != (rows.pairs is not None):
        raise RecipeError(f"--compare: {model_path} reads {'text pairs' if pairs else 'single texts'}, "
                          f"{rows.model} {'text pairs' if rows.pairs is not None else 'single texts'}")


def _check_labels(model_labels: list[str] | None, wanted: list[str] | None, model_path) -> None:
    if set(model_labels or []) != set(wanted or []):
        raise RecipeError(f"{model_path} has labels {model_labels}, not {wanted}: the two models' label sets must "
                          "be the same")


def _common(rows: SplitOutputs) -> dict:
    """What outputs share with the rows they were computed on."""
    return {"task": rows.task, "split": rows.split, "model": rows.model, "texts": rows.texts, "pairs": rows.pairs,
            "labels": rows.labels, "gold": rows.gold, "columns": rows.columns}


def _run_outputs(run, rows: SplitOutputs, temperature: float | None, batch_size: int) -> SplitOutputs:
    task = TASKS[run.recipe.task]
    order = [run.labels.index(name) for name in rows.labels] if rows.labels else None  # the rows' label order
    logits = _logits(run, rows.texts, rows.pairs, batch_size, str(rows.model))
    common = _common(rows)
    if task.words:
        probabilities = [torch.from_numpy(z[:, order]).softmax(-1).numpy() for z in logits]
        gold = [g[:len(p)] for g, p in zip(rows.gold, probabilities)]  # words cut off by max_length have no output
        return SplitOutputs(**{**common, "gold": gold}, predicted=[p.argmax(-1) for p in probabilities],
                            probabilities=probabilities)
    logits = torch.stack(logits)
    if not task.classes:
        return SplitOutputs(**common, predicted=logits[:, 0].numpy().astype(np.float64))
    logits = logits[:, order]
    if rows.task == "multi_label_classification":
        thresholds = task.thresholds(run.model.config, run.recipe, run.labels)[order].numpy()
        probabilities = logits.sigmoid().numpy()
        return SplitOutputs(**common, predicted=(probabilities > thresholds).astype(np.int64),
                            probabilities=probabilities, thresholds=thresholds)
    if temperature is not None:
        logits = logits / temperature
    probabilities = logits.double().softmax(-1).numpy()
    return SplitOutputs(**common, predicted=probabilities.argmax(-1), probabilities=probabilities,
                        temperature=temperature)


@torch.inference_mode()
def _logits(run, texts: list, pairs: list | None, batch_size: int, desc: str) -> list:
    """Per row: the logits (C,) or (1,) as a tensor, or, for words, a (n_words, C) array at first sub-words.
    Rows go through in length order (little padding), on a GPU when there is one."""
    task, tokenizer, max_length = TASKS[run.recipe.task], run.tokenizer, run.recipe.data.max_length
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = run.model.to(device).eval()
    lengths = [len(ids) for ids in tokenizer(list(texts), list(pairs) if pairs else None, truncation=True,
                                             max_length=max_length, is_split_into_words=task.words)["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    out: list = [None] * len(texts)
    for start in bar(range(0, len(order), batch_size), desc=f"analyze {desc}"):
        rows = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in rows], [pairs[i] for i in rows] if pairs else None, truncation=True,
                        max_length=max_length, padding=True, return_tensors="pt", is_split_into_words=task.words)
        logits = model(**enc.to(device)).logits.float().cpu()
        for j, i in enumerate(rows):
            out[i] = _first_subwords(logits[j], enc.word_ids(j)) if task.words else logits[j]
    return out


def _first_subwords(logits: torch.Tensor, word_ids: list[int | None]) -> np.ndarray:
    positions, previous = [], None
    for position, word in enumerate(word_ids):
        if word is not None and word != previous:
            positions.append(position)
        previous = word
    return logits[positions].numpy()


def _ensemble_outputs(ensemble, rows: SplitOutputs, batch_size: int) -> SplitOutputs:
    from finetune.ensemble import average, member_outputs, predict_ids

    outputs = torch.stack([member_outputs(m, rows.texts, rows.pairs, rows.labels, batch_size)
                           for m in ensemble.members])
    weights = torch.tensor(ensemble.weights, dtype=torch.float64)
    common = _common(rows)
    if rows.labels is None:
        return SplitOutputs(**common, predicted=average(outputs.double(), weights).numpy())
    probabilities = average(outputs.double(), weights).numpy()
    return SplitOutputs(**common, predicted=predict_ids(outputs, weights, ensemble.method).numpy(),
                        probabilities=probabilities)
