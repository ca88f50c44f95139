"""Frozen-feature cache: compute what the frozen part of the model outputs once, train the rest on it.

Frozen parts run in eval mode (no dropout), so they map each example to the same output every epoch:
  - head_only: the backbone's pooled vector. Every epoch after the first costs a few matrix-vector
    products instead of a backbone forward pass.
  - freeze with frozen embeddings and first N layers (BERT-style encoders): the hidden states after
    layer N, one (tokens x hidden) matrix per example. The upper layers and the head train on them,
    skipping the frozen lower part's forward pass.
A sweep over head settings, learning rate or epochs reuses them across trials.

The cache key covers everything the features depend on: the backbone folder and its weight files
(size and modification time), revision, dtype, what is cached (pooled vector with its pooling, or
the hidden states after N layers), autocast precision, and each tokenised split's ``datasets``
fingerprint (which covers the data files, subsampling, tokenizer and max_length). Anything else
changing means another key, never a stale hit. Location: ``$FINETUNE_CACHE/features`` (default
``~/.cache/finetune/features``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from finetune.config import RecipeConfig
from finetune.policies import policy_of
from finetune.progress import bar
from finetune.tasks import TASKS

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")


def applies(recipe: RecipeConfig) -> bool:
    """The policy has a frozen part to cache (``Policy.cache``: head_only's pooled vectors on sequence tasks,
    freeze's hidden states after frozen embeddings + first N layers), on a pretrained backbone (a random
    one is redrawn per seed). Whether the architecture allows hidden states is checked by ``supports``."""
    if not (recipe.train.cache_features and recipe.backbone.pretrained) or recipe.distill.teacher is not None:
        return False
    return policy_of(recipe).cache(recipe) is not None


def supports(model: nn.Module, recipe: RecipeConfig) -> bool:
    """Caching hidden states needs a BERT-style encoder (``embeddings`` + ``encoder.layer``), whose
    layers can be run from given hidden states."""
    if policy_of(recipe).cache(recipe) == "pooled":
        return True
    backbone = model.backbone
    return (hasattr(backbone, "embeddings") and isinstance(getattr(getattr(backbone, "encoder", None), "layer", None),
                                                           nn.ModuleList))


def cached_output(recipe: RecipeConfig) -> str:
    if policy_of(recipe).cache(recipe) == "pooled":
        return f"pooled-{recipe.head.pooling}"
    return f"hidden-after-{recipe.policy.freeze_layers}-layers"


def cache_root() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune")) / "features"


def cache_key(recipe: RecipeConfig, backbone_path: Path, tokenised) -> str:
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                     for pattern in WEIGHT_FILES for p in Path(backbone_path).glob(pattern))
    payload = {"backbone": str(Path(backbone_path).resolve()), "weights": weights, "revision": recipe.backbone.revision,
               "dtype": recipe.backbone.dtype, "output": cached_output(recipe),
               "mixed_precision": recipe.train.mixed_precision,
               "splits": {split: ds._fingerprint for split, ds in tokenised.items()}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


class FeatureSet(Dataset):
    """Cached pooled vectors and labels of one split; batches are {"features", "labels"}."""

    collate = None  # the default collation stacks them

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


class HiddenSet(Dataset):
    """Cached hidden states of one split, stored flat (all tokens of all examples) with offsets; batches
    are {"hidden", "attention_mask", "labels"}, padded per batch like token batches."""

    def __init__(self, flat: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor, pad_to: int | None,
                 per_token: bool):
        self.flat, self.offsets, self.labels, self.pad_to = flat, offsets.tolist(), labels, pad_to or 1
        self.per_token = per_token  # token classification: one label per token, stored flat like the states

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict:
        a, b = self.offsets[index], self.offsets[index + 1]
        return {"hidden": self.flat[a:b], "labels": self.labels[a:b] if self.per_token else self.labels[index]}

    def collate(self, examples: list[dict]) -> dict:
        longest = max(e["hidden"].shape[0] for e in examples)
        width = math.ceil(longest / self.pad_to) * self.pad_to
        hidden = torch.zeros(len(examples), width, self.flat.shape[1], dtype=self.flat.dtype)
        mask = torch.zeros(len(examples), width, dtype=torch.long)
        for i, example in enumerate(examples):
            n = example["hidden"].shape[0]
            hidden[i, :n], mask[i, :n] = example["hidden"], 1
        if self.per_token:
            labels = torch.full((len(examples), width), -100, dtype=torch.long)
            for i, example in enumerate(examples):
                labels[i, :len(example["labels"])] = example["labels"]
        else:
            labels = torch.stack([e["labels"] for e in examples])
        return {"hidden": hidden, "attention_mask": mask, "labels": labels}


class _Skip(nn.Module):
    """Stands in for a frozen layer whose output is cached: passes its input on."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Given(nn.Module):
    """Stands in for the frozen embeddings: the cached hidden states arrive as ``inputs_embeds``."""

    def forward(self, inputs_embeds=None, **kwargs):
        return inputs_embeds


def _view(module: nn.Module, **children: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` with some children replaced: same parameters, and the original
    model is untouched (it is still the one exported)."""
    view = copy.copy(module)
    view._modules = {**module._modules, **children}
    return view


def _layers_view(backbone: nn.Module, layers: list[nn.Module], **children: nn.Module) -> nn.Module:
    return _view(backbone, encoder=_view(backbone.encoder, layer=nn.ModuleList(layers)), **children)


class UpperOnFeatures(nn.Module):
    """The trainable part of a model whose embeddings and first N layers are frozen, fed the cached
    hidden states after layer N. The frozen layers are skipped in place, so parameter names equal the
    full model's (``backbone.encoder.layer.N.*``, ``classifier.*``) and checkpoints load into either."""

    def __init__(self, model: nn.Module, frozen_layers: int):
        super().__init__()
        layers = list(model.backbone.encoder.layer)
        self.backbone = _layers_view(model.backbone, [_Skip() for _ in layers[:frozen_layers]] + layers[frozen_layers:],
                                     embeddings=_Given())
        self.classifier = model.classifier
        self._head = model.from_hidden  # the full model's own pooling, loss and logits code
        self._dtype = next(model.backbone.parameters()).dtype  # (all layers may be frozen: none left here)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        out = self.backbone(inputs_embeds=hidden.to(self._dtype), attention_mask=attention_mask).last_hidden_state
        return self._head(out.to(self.classifier.layers[-1].weight.dtype), attention_mask, labels)


def trainable_on_features(model: nn.Module, recipe: RecipeConfig) -> nn.Module:
    if policy_of(recipe).cache(recipe) == "pooled":
        return HeadOnFeatures(model)
    return UpperOnFeatures(model, recipe.policy.freeze_layers)


@torch.no_grad()
def _compute(model, recipe: RecipeConfig, split, collator, batch_size: int, accelerator, desc: str) -> list[torch.Tensor]:
    """The frozen part's output per example, in the split's own order (a pooled vector, or the real
    tokens' hidden states); batches sorted by length to spend little on padding."""
    was_training = model.training
    model.eval()
    model.to(accelerator.device)
    if policy_of(recipe).cache(recipe) == "pooled":
        encode = model.pooled
    else:  # the embeddings and the frozen layers only
        lower = _layers_view(model.backbone, list(model.backbone.encoder.layer)[:recipe.policy.freeze_layers])

        def encode(**batch):
            return lower(**batch).last_hidden_state
    lengths = [len(ids) for ids in split["input_ids"]]
    order = sorted(range(len(split)), key=lengths.__getitem__)
    # a private generator: iterating a loader draws a seed, and the global RNG must stay as it was, or the
    # head's dropout masks would differ between a run that computes the cache and one that reads it
    loader = DataLoader(split.select(order).remove_columns(["labels"]), batch_size=batch_size, collate_fn=collator,
                        generator=torch.Generator())
    outputs, done = [None] * len(split), 0
    for batch in bar(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            out = encode(**batch).float().cpu()
        real = batch["attention_mask"].sum(1).tolist()
        for row, n in enumerate(real):
            outputs[order[done + row]] = out[row] if out.dim() == 2 else out[row, :n].clone()
        done += len(real)
    model.train(was_training)
    return outputs


def _pack(outputs: list[torch.Tensor], labels: list, per_token: bool) -> dict[str, torch.Tensor]:
    """Stored features; ``per_token``: one label per token (token classification), stored flat like the
    states (a multi-label row's multi-hot list is one label, kept whole)."""
    if outputs[0].dim() == 1:
        return {"features": torch.stack(outputs), "labels": torch.tensor(labels)}
    offsets = torch.tensor([0] + [len(o) for o in outputs]).cumsum(0)
    flat_labels = torch.tensor([t for row in labels for t in row]) if per_token else torch.tensor(labels)
    return {"features": torch.cat(outputs), "offsets": offsets, "labels": flat_labels}


def load_or_compute(recipe: RecipeConfig, model, tokenised, backbone_path: Path, collator, accelerator,
                    pad_to: int | None = None) -> dict[str, Dataset]:
    """The cached features of every split, computing (and storing) those missing. Call on the main
    process first, so other processes read what it stored."""
    folder = cache_root() / cache_key(recipe, backbone_path, tokenised)
    sets = {}
    for split, ds in tokenised.items():
        path = folder / f"{split}.safetensors"
        if path.is_file():
            stored = load_file(str(path))
        else:
            outputs = _compute(model, recipe, ds, collator, recipe.train.eval_batch_size or 2 * recipe.train.batch_size,
                               accelerator, f"caching {split} features")
            stored = _pack(outputs, ds["labels"], per_token=TASKS[recipe.task].words)
            if accelerator.is_main_process:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                save_file(stored, str(tmp))
                os.replace(tmp, path)  # a reader never sees a half-written file
        if "offsets" in stored:
            sets[split] = HiddenSet(stored["features"], stored["offsets"], stored["labels"], pad_to,
                                    per_token=TASKS[recipe.task].words)
        else:
            sets[split] = FeatureSet(stored["features"], stored["labels"])
    return sets
