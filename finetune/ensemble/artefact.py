"""The saved ensemble: ``ENSEMBLE_DIR/ensemble.json`` written, loaded, and used to predict."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from finetune.config import RecipeConfig, RecipeError
from finetune.ensemble.combine import METHODS, average, predict_ids, vote_shares
from finetune.ensemble.members import (
    Member,
    load_members,
    member_outputs,
    shared_labels,
)
from finetune.tasks import TASKS

ARTEFACT = "ensemble.json"


class Ensemble:
    """A saved ensemble: ``Ensemble.load(DIR).predict(texts)`` returns what ``finetune.predict.predict``
    returns for one run (``label`` and ``probabilities``, or ``score``; plus ``votes`` for a vote)."""

    def __init__(self, members: list[Member], weights: list[float], method: str, recipe: RecipeConfig,
                 report: dict | None = None, config: dict | None = None):
        if not members:
            raise RecipeError("an ensemble needs at least one member")
        if method not in METHODS:
            raise RecipeError(f"--combine: expected one of {', '.join(METHODS)}, got {method!r}")
        self.members, self.weights, self.method, self.recipe = members, weights, method, recipe
        self.labels = shared_labels(members)
        if method == "vote" and not TASKS[recipe.task].votes:
            raise RecipeError(f"--combine vote does not apply to {recipe.task}; use mean or weighted")
        self.report, self.config = report, config or {}

    @torch.inference_mode()
    def predict(self, texts: list, pairs: list | None = None, batch_size: int = 64) -> list[dict]:
        """One dict per input, like ``finetune.predict.predict``."""
        texts = list(texts)
        outputs = torch.stack([member_outputs(m, texts, pairs, self.labels, batch_size) for m in self.members])
        weights = torch.tensor(self.weights, dtype=torch.float64)
        if self.labels is None:
            return [{"score": float(s)} for s in average(outputs, weights)]
        mean, ids = average(outputs, weights), predict_ids(outputs, weights, self.method)
        shares = vote_shares(outputs, weights) if self.method == "vote" else None
        results = []
        for i in range(len(texts)):
            result = {"label": self.labels[int(ids[i])],
                      "probabilities": {name: round(float(p), 6) for name, p in zip(self.labels, mean[i])}}
            if shares is not None:
                result["votes"] = {name: round(float(v), 6) for name, v in zip(self.labels, shares[i])}
            results.append(result)
        return results

    def save(self, folder: Path) -> Path:
        """Write ensemble.json atomically; members are referenced, not copied."""
        from finetune.runs import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        members = [{"name": m.name, "path": os.path.relpath(m.path.resolve(), folder.resolve()),
                    "absolute_path": str(m.path.resolve()), "weight": w} for m, w in zip(self.members, self.weights)]
        artefact = {"format": "finetune-ensemble/1", "combine": self.method, "labels": self.labels,
                    "task": self.recipe.task, "members": members, "config": self.config,
                    "recipe": self.recipe.to_dict(), "report": self.report}
        atomic_write_text(folder / ARTEFACT, json.dumps(artefact, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Ensemble:
        """Load a saved ensemble and its members (each by its relative path, else its absolute one).

        Raises:
            RecipeError: not an ensemble folder, a member missing or without its model, or members whose
                label sets differ.
        """
        folder = Path(folder)
        if not is_ensemble(folder):
            raise RecipeError(f"--model: {folder} holds no {ARTEFACT}")
        raw = json.loads((folder / ARTEFACT).read_text())
        paths = []
        for entry in raw["members"]:
            candidates = [folder / entry["path"], Path(entry["absolute_path"])]
            found = next((p for p in candidates if p.is_dir()), None)
            if found is None:
                raise RecipeError(f"ensemble {folder}: member {entry['name']} is missing (looked in "
                                  f"{candidates[0]} and {candidates[1]}); members are referenced, not copied")
            paths.append(found)
        members = load_members(paths, [e["name"] for e in raw["members"]], flag=f"ensemble {folder}")
        ensemble = cls(members, [e["weight"] for e in raw["members"]], raw["combine"],
                       RecipeConfig.from_dict(raw["recipe"]), raw.get("report"), raw.get("config"))
        if raw.get("labels") and set(raw["labels"]) != set(ensemble.labels or []):
            raise RecipeError(f"ensemble {folder}: its members now have labels {ensemble.labels}, "
                              f"not the saved {raw['labels']}")
        return ensemble


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ARTEFACT).is_file()
