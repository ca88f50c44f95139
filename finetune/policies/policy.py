"""What a training policy is: the facts the rest of the framework asks of it, in one record.

Each policy module (``full.py``, ``lora.py``, ...) builds one ``Policy``; ``finetune.policies.POLICIES``
maps names to them. The schema (``finetune.config``) cannot import this package (it stands below it), so
it keeps the names in ``PolicyConfig.kind``'s Literal and ``finetune.recipe_checks`` mirrors ``adapter``
and ``cache``; tests keep them in step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from finetune.config import RecipeConfig

Cache = Literal["pooled", "hidden"]


def _no_cache(recipe: RecipeConfig) -> Cache | None:
    return None


def _no_detail(recipe: RecipeConfig) -> str:
    return ""


@dataclass(frozen=True)
class Policy:
    name: str
    """The ``policy.kind`` value that selects it."""
    apply: Callable[[nn.Module, RecipeConfig], nn.Module]
    """Set what trains and return the model to train (a peft wrapper for adapter policies)."""
    adapter: bool = False
    """A peft wrapper: saved as adapter + ``base/``, merged (``plain``) for ``merged/``, pruning, ensembles and
    latency."""
    frozen_eval: bool = False
    """While training, modules with no trainable parameter run in eval mode (no dropout): frozen parts are
    fixed feature extractors, as the feature cache assumes."""
    cache: Callable[[RecipeConfig], Cache | None] = _no_cache
    """What ``finetune.features`` may cache for this recipe: the pooled vector, the hidden states after the
    frozen layers, or nothing."""
    no_decay: tuple[str, ...] = ()
    """Parameter-name fragments trained without weight decay, besides every tensor of ndim < 2."""
    lr: float = 1e-4
    """The learning rate ``finetune compare`` gives a variant switched to this policy."""
    preset: tuple[str, ...] = ()
    """Overrides ``finetune compare``'s preset of this name adds to ``policy.kind=NAME``."""
    describe: Callable[[RecipeConfig], str] = _no_detail
    """Detail for the model card's policy line, e.g. ``rank 8, alpha 16``; empty for none."""
    transformers_loads: bool = True
    """Adapters: transformers' own adapter loading (``pipeline(model=RUN)``) restores every trained weight, as
    peft's ``PeftModel.from_pretrained`` does. The model card offers it only when true."""
