"""Frozen-feature cache for head-only training.

When only the head trains, the frozen backbone (in eval mode: no dropout) maps each example to
the same pooled vector every epoch. So compute those vectors once, keep them on disk, and train
the head on them: every epoch after the first costs a few matrix-vector products instead of a
backbone forward pass, and a sweep over head settings, learning rate or epochs reuses them.

The cache key covers everything the vectors depend on: the backbone folder and its weight files
(size and modification time), revision, dtype, pooling, autocast precision, and each tokenised
split's ``datasets`` fingerprint (which covers the data files, subsampling, tokenizer and
max_length). Anything else changing means another key, never a stale hit. Location:
``$FINETUNE_CACHE/features`` (default ``~/.cache/finetune/features``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from finetune.config import Recipe

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")


def applies(recipe: Recipe) -> bool:
    """Head-only sequence tasks on a pretrained backbone (a random one is redrawn per seed)."""
    return (recipe.train.cache_features and recipe.policy.kind == "head_only"
            and recipe.task != "token_classification" and recipe.backbone.pretrained)


def cache_root() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune")) / "features"


def cache_key(recipe: Recipe, backbone_path: Path, tokenised) -> str:
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                     for pattern in WEIGHT_FILES for p in Path(backbone_path).glob(pattern))
    payload = {"backbone": str(Path(backbone_path).resolve()), "weights": weights, "revision": recipe.backbone.revision,
               "dtype": recipe.backbone.dtype, "pooling": recipe.head.pooling,
               "mixed_precision": recipe.train.mixed_precision,
               "splits": {split: ds._fingerprint for split, ds in tokenised.items()}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


class FeatureSet(Dataset):
    """Cached pooled vectors and labels of one split; batches are {"features", "labels"}."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"features": self.features[index], "labels": self.labels[index]}


class HeadOnFeatures(nn.Module):
    """The trainable part of a head-only model, fed cached vectors. Its parameter names equal the
    full model's (``classifier.*``), so checkpoints load into either."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.classifier = model.classifier
        self._classify = model.classify  # the full model's own loss and logits code

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None):
        return self._classify(features, labels)


@torch.no_grad()
def _compute(model, split, collator, batch_size: int, accelerator, desc: str) -> torch.Tensor:
    """Pooled vectors in the split's own order; batches sorted by length to spend little on padding."""
    was_training = model.training
    model.eval()
    model.to(accelerator.device)
    lengths = [len(ids) for ids in split["input_ids"]]
    order = sorted(range(len(split)), key=lengths.__getitem__)
    # a private generator: iterating a loader draws a seed, and the global RNG must stay as it was, or the
    # head's dropout masks would differ between a run that computes the cache and one that reads it
    loader = DataLoader(split.select(order).remove_columns(["labels"]), batch_size=batch_size, collate_fn=collator,
                        generator=torch.Generator())
    chunks = []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            chunks.append(model.pooled(**batch).float().cpu())
    model.train(was_training)
    by_length = torch.cat(chunks)
    features = torch.empty_like(by_length)
    features[torch.tensor(order)] = by_length
    return features


def load_or_compute(recipe: Recipe, model, tokenised, backbone_path: Path, collator, accelerator) -> dict[str, FeatureSet]:
    """The cached vectors of every split, computing (and storing) those missing. Call on the main
    process first, so other processes read what it stored."""
    folder = cache_root() / cache_key(recipe, backbone_path, tokenised)
    sets = {}
    for split, ds in tokenised.items():
        path = folder / f"{split}.safetensors"
        if path.is_file():
            stored = load_file(str(path))
        else:
            stored = {"features": _compute(model, ds, collator, recipe.train.eval_batch_size or 2 * recipe.train.batch_size,
                                           accelerator, f"caching {split} features"),
                      "labels": torch.tensor(ds["labels"])}
            if accelerator.is_main_process:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                save_file(stored, str(tmp))
                os.replace(tmp, path)  # a reader never sees a half-written file
        sets[split] = FeatureSet(stored["features"], stored["labels"])
    return sets
