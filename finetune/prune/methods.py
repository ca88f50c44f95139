"""The pruning methods themselves: magnitude (unstructured), attention heads and encoder layers."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from finetune.config import RecipeError
from finetune.modeling import (
    attention_projections,
    encoder_layers,
    head_count,
    remove_heads,
)
from finetune.progress import bar

log = logging.getLogger("finetune")


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[dict]) -> float:
    model.eval()
    total = sum(model(**batch).loss.item() * len(batch["labels"]) for batch in batches)
    return total / sum(len(batch["labels"]) for batch in batches)




# --- magnitude ------------------------------------------------------------------------------


def prunable_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The backbone's linear layers; the task head is a tiny share of the weights and pruning it
    only costs accuracy, so it is excluded."""
    return [(module, "weight") for module in model.backbone.modules() if isinstance(module, nn.Linear)]


def magnitude_prune(model: nn.Module, sparsity: float) -> list[tuple[nn.Module, str]]:
    """Zero the smallest |w| across all backbone linear weights (one global threshold). The masks
    stay attached (``weight = weight_orig * weight_mask``) until ``make_permanent``, so a recovery
    fine-tune cannot revive pruned weights."""
    targets = prunable_linears(model)
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    return targets


def make_permanent(targets: list[tuple[nn.Module, str]]) -> dict[str, Any]:
    """Fold the masks into the weights and report the sparsity reached."""
    for module, name in targets:
        torch_prune.remove(module, name)
    weights = sum(module.weight.numel() for module, _ in targets)
    zeros = sum(int((module.weight == 0).sum()) for module, _ in targets)
    return {"scope": "backbone linear weights (attention query/key/value/output, feed-forward); embeddings, "
                     "LayerNorms, biases and the task head are not pruned",
            "prunable_weights": weights, "zero_weights": zeros, "sparsity_reached": zeros / weights}


# --- attention heads --------------------------------------------------------------------------


def _gate(gate: torch.Tensor, head_size: int):
    def scale_heads(module, args):  # the output projection's input is (B, T, heads x head_size)
        return (args[0] * gate.repeat_interleave(head_size).to(args[0].dtype), *args[1:])
    return scale_heads


def head_importance(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    """Per layer, each head's importance: |d loss / d gate| for a gate of ones on the head's output
    (Michel et al. 2019), summed over the batches and normalised per layer so layers compare."""
    device = next(model.parameters()).device
    gates, hooks = [], []
    for layer in encoder_layers(model.backbone):
        attention, _, owner, output = attention_projections(layer)
        gate = torch.ones(head_count(layer), device=device, requires_grad=True)
        hooks.append(getattr(owner, output).register_forward_pre_hook(_gate(gate, attention.attention_head_size)))
        gates.append(gate)
    scores = [torch.zeros_like(gate) for gate in gates]
    model.eval()
    try:
        for batch in bar(batches, desc="head importance", leave=False):
            grads = torch.autograd.grad(model(**batch).loss, gates)
            for score, grad in zip(scores, grads):
                score += grad.abs()
    finally:
        for hook in hooks:
            hook.remove()
    return [score / score.norm().clamp(min=1e-12) for score in scores]


def heads_to_remove(counts: list[int], fraction: float) -> int:
    """How many heads ``fraction`` removes; every layer must keep one.

    Raises:
        RecipeError: the fraction would empty a layer.
    """
    total, removable = sum(counts), sum(counts) - len(counts)
    wanted = round(fraction * total)
    if wanted > removable:
        raise RecipeError(f"prune.heads_fraction (--heads-fraction)={fraction} would remove {wanted} of {total} "
                          f"heads, but each of the {len(counts)} layers keeps at least one: at most {removable} "
                          f"heads can go (a fraction up to {removable / total:.3f})")
    return wanted


def choose_heads(scores: list[torch.Tensor], count: int) -> dict[int, list[int]]:
    """The ``count`` least important heads overall, skipping any that would be a layer's last."""
    ranked = sorted((float(score[h]), layer, h) for layer, score in enumerate(scores) for h in range(len(score)))
    left, chosen = [len(score) for score in scores], {}
    for _, layer, head in ranked:
        if sum(map(len, chosen.values())) == count:
            break
        if left[layer] > 1:
            chosen.setdefault(layer, []).append(head)
            left[layer] -= 1
    return {layer: sorted(heads) for layer, heads in sorted(chosen.items())}


def prune_heads(model: nn.Module, chosen: dict[int, list[int]]) -> None:
    """Remove the heads and record them (by their original numbers) in the model config, which
    rebuilds the smaller attention when the saved model is loaded."""
    original = model.config.backbone_config.num_attention_heads
    for layer, heads in chosen.items():
        before = set(model.config.removed_heads.get(str(layer), []))
        present = [h for h in range(original) if h not in before]  # current head number -> original number
        model.config.removed_heads[str(layer)] = sorted(before | {present[h] for h in heads})
    remove_heads(model.backbone, chosen)


# --- layers ---------------------------------------------------------------------------------


@contextmanager
def only_layers(model: nn.Module, kept: list[int]):
    """Run the encoder with a subset of its layers, then put them all back."""
    layers = encoder_layers(model.backbone)
    everything = list(layers)
    del layers[:]
    layers.extend(everything[i] for i in kept)
    try:
        yield
    finally:
        del layers[:]
        layers.extend(everything)


def choose_layers(model: nn.Module, keep: int, selection: str, batches: list[dict]) -> tuple[list[int], list[dict]]:
    """Indices of the layers to keep, and (importance) the validation loss seen at each removal."""
    kept = list(range(len(encoder_layers(model.backbone))))
    if selection == "first":
        return kept[:keep], []
    steps = []
    while len(kept) > keep:
        losses = {}
        for i in bar(kept, desc=f"layer importance ({len(kept)} layers)", leave=False):
            with only_layers(model, [j for j in kept if j != i]):
                losses[i] = mean_loss(model, batches)
        drop = min(losses, key=losses.get)
        kept.remove(drop)
        steps.append({"dropped": drop, "loss_without": {str(i): round(v, 5) for i, v in losses.items()}})
        log.info("dropping layer %d (validation loss without it %.4f)", drop, losses[drop])
    return kept, steps


def keep_layers(model: nn.Module, kept: list[int]) -> None:
    """Keep only these layers, renumbered 0..k-1; the config says k layers, so the saved folder
    loads with plain ``from_pretrained``. Removed-head records follow their layers."""
    layers = encoder_layers(model.backbone)
    modules = [layers[i] for i in kept]
    del layers[:]
    layers.extend(modules)
    for index, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    for config in {id(c): c for c in (model.config.backbone_config, model.backbone.config)}.values():
        config.num_hidden_layers = len(kept)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[i] for i in kept]
    model.config.removed_heads = {str(kept.index(int(k))): v for k, v in model.config.removed_heads.items()
                                  if int(k) in kept}


