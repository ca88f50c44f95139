"""An exported folder in use: ``load_exported(FOLDER).predict(texts)`` gives what ``finetune.predict.predict``
gives on the run it came from, through the exported model instead of the training code's PyTorch model.

    model = load_exported("runs/sst2-onnx")
    model.predict(["a gripping film"])      # [{"label": "positive", "probabilities": {...}}]
    model.logits(model.tokenizer(["a gripping film"], return_tensors="np"))   # for latency measurements
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune.config import RecipeConfig
from finetune.errors import RunFolderError
from finetune.export.formats import Logits, open_model

EXPORT_FILE = "export.json"


def is_exported(folder: str | Path) -> bool:
    """A folder ``finetune export`` wrote (it holds export.json)."""
    return (Path(folder) / EXPORT_FILE).is_file()


def read_meta(folder: Path) -> dict:
    """export.json, checked for what loading needs.

    Raises:
        RunFolderError: missing, damaged, or written by an export of another layout.
    """
    file = folder / EXPORT_FILE
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{folder} is not an exported model folder (no {EXPORT_FILE}); export a run with "
                             f"finetune export RUN") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFolderError(f"{file} is damaged ({type(err).__name__}); export the run again") from None
    needed = ("format", "model_file", "inputs", "task", "labels", "max_length", "recipe")
    missing = [key for key in needed if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise RunFolderError(f"{file} lacks {', '.join(missing)}; export the run again")
    if not (folder / meta["model_file"]).is_file():
        raise RunFolderError(f"{folder}: the exported model {meta['model_file']} is missing; export the run again")
    return meta


@dataclass
class ExportedModel:
    """An exported model with its tokenizer and what its predictions need (labels, thresholds, temperature)."""

    folder: Path
    meta: dict
    """export.json: format, quantization, task, labels, the export's check, versions."""
    tokenizer: object
    recipe: RecipeConfig
    """The source run's recipe (its task and data columns: what ``finetune predict --input`` reads)."""
    labels: list[str] | None
    forward: Logits
    temperature: float | None = None
    thresholds: torch.Tensor | None = None

    @property
    def max_length(self) -> int:
        return self.meta["max_length"]

    def encode(self, texts: list, pairs: list | None = None):
        """The tokenizer's batch, as the run's ``predict`` makes it (numpy arrays)."""
        from finetune.tasks import TASKS

        return self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length, padding=True,
                              return_tensors="np", is_split_into_words=TASKS[self.meta["task"]].words)

    def logits(self, enc) -> np.ndarray:
        """The model's float32 logits, (B, C) or (B, T, C), for a tokenised batch (numpy or torch arrays)."""
        arrays = {name: enc[name].cpu().numpy() if isinstance(enc[name], torch.Tensor) else np.asarray(enc[name])
                  for name in self.meta["inputs"]}
        return self.forward(arrays)

    def predict(self, texts: list, pairs: list | None = None, batch_size: int = 64) -> list[dict]:
        """One dict per input, the same as ``finetune.predict.predict`` on the source run (see there)."""
        from finetune.tasks import TASKS

        task = TASKS[self.meta["task"]]
        results = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            enc = self.encode(chunk, pairs[start:start + batch_size] if pairs else None)
            logits = torch.from_numpy(self.logits(enc)).float()
            if self.temperature is not None and task.name == "classification":
                logits = logits / self.temperature  # calibrated probabilities, as the run predicts
            results += task.predict(logits, enc, chunk, self.labels, self.thresholds)
        return results


def load_exported(folder: str | Path, threads: int | None = None) -> ExportedModel:
    """Load an exported folder (any format) with its tokenizer.

    ``threads``: onnxruntime's intra-op threads (default: its own choice, every core).

    Raises:
        RunFolderError: not an exported folder, or its export.json is damaged or its model missing.
        RecipeError: the format needs a package that is not installed (the install command is named).
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise RunFolderError(f"--model: {folder} " + ("is a file, not a folder" if folder.exists() else "does not exist"))
    meta = read_meta(folder)
    thresholds = meta.get("thresholds")
    return ExportedModel(
        folder=folder, meta=meta, tokenizer=AutoTokenizer.from_pretrained(str(folder)),
        recipe=RecipeConfig.from_dict(meta["recipe"]), labels=meta["labels"],
        forward=open_model(folder, meta, threads), temperature=meta.get("temperature"),
        thresholds=torch.tensor(thresholds, dtype=torch.float32) if thresholds is not None else None)
