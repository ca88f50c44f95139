"""Ensemble members: finished run folders loaded once each, and their outputs on a list of inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune import runs
from finetune.config import RecipeError
from finetune.predict import LoadedRun, load_run
from finetune.progress import bar
from finetune.tasks import TASKS

log = logging.getLogger("finetune.ensemble")  # one logger for the package: setup_logging configures it


@dataclass
class Member:
    name: str
    path: Path
    run: LoadedRun


def has_model(run_dir: Path) -> bool:
    """A run folder whose model files are still there (a sweep removes those outside keep_top_k)."""
    return runs.has_model(run_dir) and any((run_dir / name).is_file() for name in runs.WEIGHTS)


def load_members(paths: list[Path], names: list[str] | None = None, flag: str = "--models") -> list[Member]:
    """Load each run once (a path listed twice shares its model), adapters merged for speed.

    Raises:
        RecipeError: a path is missing, is not a run folder, or its model was removed.
    """
    names = names or _unique_names(paths)
    loaded: dict[Path, LoadedRun] = {}
    members = []
    for name, path in zip(names, paths):
        path = Path(path)
        if not path.is_dir():
            raise RecipeError(f"{flag}: member {path} does not exist")
        if (path / runs.MODEL_REMOVED).exists():
            raise RecipeError(f"{flag}: member {path} has no model: {(path / runs.MODEL_REMOVED).read_text().strip()}")
        if not has_model(path):
            raise RecipeError(f"{flag}: {path} is not a finished run folder (no label_map.json and model files)")
        key = path.resolve()
        if key not in loaded:
            log.info("loading %s (%s)", name, path)
            loaded[key] = _merged(load_run(path))
        task = loaded[key].recipe.task
        if not TASKS[task].ensembles:  # per-token tags; multi-label: averaging sigmoids and thresholds not done yet
            raise RecipeError(f"{flag}: {path} is a {task} run; ensembles combine classification "
                              "and regression runs only")
        members.append(Member(name, path, loaded[key]))
    return members


def _merged(run: LoadedRun) -> LoadedRun:
    """Fold adapters into the weights: the same function, fewer matrix products per layer."""
    from finetune.policies import plain

    run.model = plain(run.model)[0].eval()
    return run


def _unique_names(paths: list[Path]) -> list[str]:
    names: list[str] = []
    for path in paths:
        name = Path(path).name or str(path)
        names.append(name if name not in names else f"{name}#{names.count(name) + 1}")
    return names


def shared_labels(members: list[Member]) -> list[str] | None:
    """The first member's labels; every other member must have the same task and label set.

    Raises:
        RecipeError: tasks or label sets differ (the message names the member and both sets).
    """
    first = members[0].run
    for member in members[1:]:
        run = member.run
        if run.recipe.task != first.recipe.task:
            raise RecipeError(f"members differ in task: {members[0].name} is {first.recipe.task}, "
                              f"{member.name} is {run.recipe.task}")
        if set(run.labels or []) != set(first.labels or []):
            raise RecipeError(f"members have different label sets: {members[0].name} has {first.labels}, "
                              f"{member.name} has {run.labels}; an ensemble needs the same labels in every member")
    return first.labels


@torch.inference_mode()
def member_outputs(member: Member, texts: list, pairs: list | None, labels: list[str] | None,
                   batch_size: int = 64, desc: str = "") -> torch.Tensor:
    """What the task averages (``Task.scores``): probabilities (N, C) with columns in ``labels`` order, or
    scores (N,) for regression, rows in input order. Inputs are batched by length (little padding); each member uses its own tokenizer and max_length."""
    run, n, task = member.run, len(texts), TASKS[member.run.recipe.task]
    max_length = run.recipe.data.max_length
    lengths = [len(ids) for ids in run.tokenizer(list(texts), list(pairs) if pairs else None, truncation=True,
                                                 max_length=max_length)["input_ids"]]
    order = sorted(range(n), key=lengths.__getitem__)
    columns = [run.labels.index(label) for label in labels] if labels else None
    out = torch.empty((n, len(labels)) if labels else (n,))
    for start in bar(range(0, n, batch_size), desc=desc or member.name, leave=False):
        rows = order[start:start + batch_size]
        enc = run.tokenizer([texts[i] for i in rows], [pairs[i] for i in rows] if pairs else None, truncation=True,
                            max_length=max_length, padding=True, return_tensors="pt")
        logits = run.model(**enc).logits.float()
        out[rows] = task.scores(logits)[:, columns] if columns else task.scores(logits)
    return out
