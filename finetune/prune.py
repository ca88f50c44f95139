"""Prune a finished run: weights by magnitude, attention heads, or whole encoder layers.

    finetune prune --model RUN_DIR --method magnitude --sparsity 0.5 --finetune-epochs 1
    finetune prune --model RUN_DIR --method heads --heads-fraction 0.25
    finetune prune --model RUN_DIR --method layers --layers-kept 3 --layer-selection first

or a recipe's ``prune:`` section (``PruneConfig``), applied to the best model after training.
``prune_run`` reads as the story: load the run (a LoRA adapter is merged into its base first),
measure it, prune, optionally fine-tune to recover, measure again, and save the pruned model as
a complete run folder (loads with ``load_run``, ``finetune eval`` / ``predict``) holding
``prune_report.json`` and ``prune_report.md``.

Methods:
  magnitude  global L1 unstructured pruning over the backbone's linear layers (attention query/key/
             value/output and feed-forward weights): exactly round(sparsity x their weights) are set
             to zero, then made permanent. Embeddings, LayerNorms, biases and the small task head are
             left alone. The tensors stay dense, so the files are as large as before (the report
             also gives a compressed size, where the zeros show).
  heads      attention heads ranked by importance on validation data (Michel et al. 2019: |d loss / d
             gate| of a gate on each head's output, normalised per layer), the least important
             ``heads_fraction`` of all heads removed for real (smaller query/key/value and output
             projections). Every layer keeps at least one head.
  layers     keep ``layers_kept`` encoder layers: the first ones, or by importance (greedily drop the
             layer whose removal raises validation loss least).

The recovery fine-tune (``finetune_epochs``) trains every remaining weight, whatever the run's policy;
under magnitude pruning the masks stay in place during it, so the sparsity is still exact at the end.
Pruning runs in a single process (see ``check_single_process``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn
from torch.nn.utils import prune as torch_prune
from tqdm.auto import tqdm

from finetune import data as data_lib
from finetune.config import PruneConfig, Recipe, RecipeError
from finetune.inference import (
    compressed_size_bytes,
    latency_ms,
    parameter_counts,
    weights_size_bytes,
)
from finetune.modeling import (
    attention_projections,
    encoder_layers,
    head_count,
    remove_heads,
)
from finetune.runs import (
    RunResult,
    atomic_write_text,
    export_model,
    replace_dir,
    write_model_card,
)

log = logging.getLogger("finetune")
LATENCY_REPEATS = 20
MB = 1024 * 1024


def check_single_process() -> None:
    """Pruning, its importance scores and the recovery fine-tune run in one process.

    Raises:
        RecipeError: started under several processes (``accelerate launch --num_processes N``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecipeError("prune: pruning runs in a single process, not under accelerate launch with several; "
                          "train without prune.method, then run `finetune prune --model RUN_DIR ...` in one process")


# --- the data and evaluation shared by the before/after measurements ----------------------------


@dataclass
class Bench:
    """A run's recipe and data, tokenised once, with the evaluation set-up used before and after pruning."""
    recipe: Recipe
    labels: list[str] | None
    tokenizer: Any
    tokenised: Any
    """datasets.DatasetDict: validation, test (when the recipe has one) and train (for recovery)."""
    texts: list
    """Validation inputs (strings, or word lists for token classification), for latency."""
    pairs: list | None
    accelerator: Any
    collator: Any
    metrics: Any


def open_bench(recipe: Recipe, tokenizer, labels: list[str] | None, with_train: bool) -> Bench:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from datasets import DatasetDict

    from finetune.metrics import MetricSuite

    raw = data_lib.load_splits(recipe.data)
    data_lib.label_names(recipe, raw)  # every label must be one the model knows
    needed = DatasetDict({split: raw[split] for split in raw if with_train or split != "train"})
    tokenised = data_lib.tokenize(recipe, needed, tokenizer, labels)
    AcceleratorState._reset_state(reset_partial_state=False)  # one fresh state per use, as in finetune.loop.Run
    GradientState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=recipe.train.gradient_accumulation_steps,
                              mixed_precision=recipe.train.mixed_precision)
    collator = data_lib.make_collator(recipe, tokenizer, data_lib.pad_multiple(accelerator.device))
    metrics = MetricSuite(recipe.eval.metrics)
    metrics.load()
    cols, token_task = recipe.data.columns, recipe.task == "token_classification"
    validation = raw["validation"]
    texts = validation[cols.tokens if token_task else cols.text]
    pairs = validation[cols.text_pair] if cols.text_pair and not token_task else None
    return Bench(recipe, labels, tokenizer, tokenised, texts, pairs, accelerator, collator, metrics)


def evaluate_splits(model: nn.Module, bench: Bench) -> dict[str, dict]:
    """Loss and metrics on validation and test, with the training loop's own evaluation."""
    from finetune.loop import evaluate

    accelerator = bench.accelerator
    prepared = accelerator.prepare_model(model, evaluation_mode=True)
    results = {}
    for split in ("validation", "test"):
        if split in bench.tokenised:
            loader = data_lib.make_eval_loader(bench.recipe, bench.tokenised[split], bench.collator)
            results[split] = evaluate(prepared, accelerator.prepare_data_loader(loader), accelerator,
                                      bench.recipe, bench.metrics, bench.labels, f"evaluating {split}")
    # drop a mixed-precision autocast wrapper again: latency and the saved model use the model's own dtype
    accelerator.unwrap_model(prepared, keep_fp32_wrapper=False).eval()
    return results


def measure(model: nn.Module, bench: Bench, folder: Path, repeats: int) -> dict[str, Any]:
    """Parameters, size of the saved weights, and CPU latency at batch 1 and 32 (median of ``repeats``)."""
    model.to("cpu")
    counts = parameter_counts(model)
    max_length = bench.recipe.data.max_length
    return {
        "parameters": counts["total"], "nonzero_parameters": counts["nonzero"],
        "size_mb": round(weights_size_bytes(folder) / MB, 2),
        "compressed_mb": round(compressed_size_bytes(folder) / MB, 2),
        **{f"latency_ms_batch{size}": round(latency_ms(model, bench.tokenizer, bench.texts, size, max_length,
                                                       repeats, pairs=bench.pairs), 2)
           for size in (1, 32)},
    }


def importance_batches(model: nn.Module, bench: Bench, samples: int) -> list[dict[str, torch.Tensor]]:
    """The first ``samples`` validation examples, batched, on the model's device."""
    validation = bench.tokenised["validation"]
    subset = validation.select(range(min(samples, len(validation))))
    device = next(model.parameters()).device
    loader = data_lib.make_eval_loader(bench.recipe, subset, bench.collator)
    return [{k: v.to(device) for k, v in batch.items()} for batch in loader]


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
        for batch in tqdm(batches, desc="head importance", leave=False):
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
        for i in tqdm(kept, desc=f"layer importance ({len(kept)} layers)", leave=False):
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


# --- recovery fine-tune -----------------------------------------------------------------------


def recover(model: nn.Module, bench: Bench, cfg: PruneConfig) -> dict[str, Any]:
    """Fine-tune every remaining weight for ``cfg.finetune_epochs`` with the run's training settings
    (batch size, schedule, warm-up, clipping; ``finetune_lr`` or train.lr). The final weights are kept."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from finetune.loop import make_optimizer

    recipe, accelerator = bench.recipe, bench.accelerator
    lr = cfg.finetune_lr or recipe.train.lr
    loader = data_lib.make_train_loader(recipe, bench.tokenised["train"], bench.collator)
    sampler = loader.sampler
    total = max(1, math.ceil(cfg.finetune_epochs * math.ceil(len(loader) / recipe.train.gradient_accumulation_steps)))
    for param in model.parameters():
        param.requires_grad_(True)
    set_seed(recipe.train.seed)
    optimizer = make_optimizer(model, recipe.with_overrides([f"train.lr={lr}"]))
    scheduler = get_scheduler({"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[
        recipe.train.scheduler], optimizer, num_warmup_steps=int(recipe.train.warmup_ratio * total),
        num_training_steps=total)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    progress = tqdm(total=total, desc="recovery fine-tune", leave=False)
    step, epoch, started = 0, 0, time.perf_counter()
    while step < total:
        loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and recipe.train.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), recipe.train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                scheduler.step()
                step += 1
                progress.update(1)
                if step % recipe.train.log_every == 0:
                    progress.set_postfix(loss=f"{loss.item():.4f}")
                if step >= total:
                    break
        epoch += 1
    progress.close()
    seconds = time.perf_counter() - started
    log.info("recovery fine-tune: %d steps, lr %.2e, %.1f s, last loss %.4f", step, lr, seconds, loss.item())
    return {"epochs": cfg.finetune_epochs, "lr": lr, "steps": step, "seconds": round(seconds, 1)}


# --- the story ------------------------------------------------------------------------------


def check_fits(model: nn.Module, cfg: PruneConfig) -> None:
    """Settings that depend on the model, checked before any work.

    Raises:
        RecipeError: method none, layers_kept not below the layer count, a heads_fraction that
            would empty a layer, or an architecture without a known layer list.
    """
    if cfg.method == "none":
        raise RecipeError("prune.method (--method): choose magnitude, heads or layers")
    if cfg.method == "magnitude":
        return
    try:
        layers = encoder_layers(model.backbone)
        counts = [head_count(layer) for layer in layers]
    except ValueError as err:
        raise RecipeError(f"prune.method={cfg.method}: {err}") from None
    if cfg.method == "layers" and cfg.layers_kept >= len(layers):
        raise RecipeError(f"prune.layers_kept (--layers-kept)={cfg.layers_kept}: the model has {len(layers)} encoder "
                          f"layers; keep between 1 and {len(layers) - 1}")
    if cfg.method == "heads":
        heads_to_remove(counts, cfg.heads_fraction)


def apply_method(model: nn.Module, cfg: PruneConfig, bench: Bench) -> tuple[list, dict[str, Any]]:
    """Prune in place. Returns the magnitude targets whose masks are still attached, and details."""
    if cfg.method == "magnitude":
        return magnitude_prune(model, cfg.sparsity), {}
    layers = encoder_layers(model.backbone)
    counts = [head_count(layer) for layer in layers]
    batches = importance_batches(model, bench, cfg.importance_samples)
    if cfg.method == "heads":
        chosen = choose_heads(head_importance(model, batches), heads_to_remove(counts, cfg.heads_fraction))
        prune_heads(model, chosen)
        after = [head_count(layer) for layer in layers]
        log.info("removed %d of %d heads: %s", sum(counts) - sum(after), sum(counts), chosen)
        return [], {"heads_before": sum(counts), "heads_after": sum(after), "heads_per_layer": after,
                    "removed_now": {str(k): v for k, v in chosen.items()},
                    "removed_heads_original_numbers": dict(model.config.removed_heads)}
    kept, steps = choose_layers(model, cfg.layers_kept, cfg.layer_selection, batches)
    keep_layers(model, kept)
    log.info("kept layers %s of %d", kept, len(counts))
    return [], {"layers_before": len(counts), "layers_kept": kept, "selection": cfg.layer_selection,
                "importance_steps": steps}


def plain_model(model: nn.Module) -> tuple[nn.Module, bool]:
    """A LoRA run's adapter merged into its base (pruning needs plain weights); others as they are."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload(), True
    return model, False


def check_output(output: Path, run_dir: Path, overwrite: bool) -> None:
    if output.resolve() == run_dir.resolve():
        raise RecipeError("--output: choose a folder other than the run itself")
    if output.exists() and any(output.iterdir()):
        if not (output / "prune_report.json").is_file():
            raise RecipeError(f"--output: {output} is not empty and holds no pruned run; choose an empty or new folder")
        if not overwrite:
            raise RecipeError(f"--output: {output} already holds a pruned run; pass --overwrite to replace it")


def prune_run(run_dir: str | Path, cfg: PruneConfig, output: str | Path, overrides: list[str] | tuple = (),
              overwrite: bool = False, latency_repeats: int = LATENCY_REPEATS) -> dict[str, Any]:
    """Prune a finished run into ``output`` (a complete run folder); returns the report.

    ``overrides`` are dotted recipe keys applied to the run's recipe (e.g. data.max_eval_samples=500);
    latency is the median of ``latency_repeats`` timed batches at each batch size.

    Raises:
        RecipeError: not a run folder, bad settings for this model, an occupied output folder,
            or several processes.
    """
    from finetune.predict import load_run

    check_single_process()
    run_dir, output, started = Path(run_dir), Path(output), time.perf_counter()
    run = load_run(run_dir)
    check_output(output, run_dir, overwrite)
    recipe = run.recipe.with_overrides(list(overrides))
    if run.labels:
        recipe.data.labels = run.labels  # the model's labels, whatever the data holds
    model, merged = plain_model(run.model)
    check_fits(model, cfg)
    bench = open_bench(recipe, run.tokenizer, run.labels, with_train=cfg.finetune_epochs > 0)
    log.info("pruning %s: method %s%s", run_dir, cfg.method, " (LoRA adapter merged first)" if merged else "")
    before = {**measure(model, bench, run_dir, latency_repeats), **evaluate_splits(model, bench)}

    masked, details = apply_method(model, cfg, bench)
    recovery = recover(model, bench, cfg) if cfg.finetune_epochs > 0 else None
    model = bench.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if masked:
        details = make_permanent(masked)
        log.info("sparsity %.4f over %s weights", details["sparsity_reached"], f"{details['prunable_weights']:,}")
    after_metrics = evaluate_splits(model, bench)

    tmp = output.with_name(f".{output.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted prune
    tmp.mkdir(parents=True)
    export_model(model, run.tokenizer, run.labels, tmp, merge_lora=False)
    after = {**measure(model, bench, tmp, latency_repeats), **after_metrics}
    report = {"source": str(run_dir), "output": str(output), "config": cfg.model_dump(mode="json"),
              "lora_merged": merged, "details": details, "recovery": recovery,
              "latency": {"device": "cpu", "threads": torch.get_num_threads(), "repeats": latency_repeats,
                          "inputs": "validation split", "max_length": recipe.data.max_length},
              "before": before, "after": after, "seconds": round(time.perf_counter() - started, 1)}
    save_run_files(tmp, recipe, output, cfg, report, model)
    replace_dir(tmp, output)
    return report


def save_run_files(folder: Path, recipe: Recipe, output: Path, cfg: PruneConfig, report: dict, model: nn.Module) -> None:
    """recipe.yaml (the run's, naming this folder and the pruning applied), metrics.json, model card
    and the report, beside the exported model."""
    recipe = recipe.with_overrides([])
    recipe.output.dir, recipe.prune = str(output), cfg
    atomic_write_text(folder / "recipe.yaml", recipe.to_yaml())
    metrics = {"validation": report["after"].get("validation"), "test": report["after"].get("test"),
               "unpruned": {split: report["before"][split] for split in ("validation", "test") if split in report["before"]}}
    atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=2))
    atomic_write_text(folder / "prune_report.json", json.dumps(report, indent=2))
    table = report_table(report)
    atomic_write_text(folder / "prune_report.md", table)
    total = parameter_counts(model)["total"]
    write_model_card(recipe, folder, metrics, total, total)
    with open(folder / "README.md", "a") as card:
        card.write("\n## Pruning\n\n" + table)


def report_table(report: dict) -> str:
    """The before/after report as a markdown table."""
    before, after, cfg = report["before"], report["after"], report["config"]
    setting = {"magnitude": f"sparsity {cfg['sparsity']}", "heads": f"heads_fraction {cfg['heads_fraction']}",
               "layers": f"layers_kept {cfg['layers_kept']} ({cfg['layer_selection']})"}[cfg["method"]]
    recovery = report["recovery"]
    lines = [f"Pruning: {cfg['method']}, {setting}; recovery fine-tune: "
             + (f"{recovery['epochs']} epoch(s), lr {recovery['lr']:g}" if recovery else "none")
             + ("; LoRA adapter merged before pruning" if report["lora_merged"] else "") + ".",
             (f"Latency: median of {report['latency']['repeats']} batches on CPU ({report['latency']['threads']} "
              "threads), validation sentences. Magnitude pruning leaves the weight files dense (same size); "
              "the compressed size shows its zeros."), "",
             "| | before | after | change |", "|---|---|---|---|"]
    rows = [("parameters", "parameters", "{:,}"), ("non-zero parameters", "nonzero_parameters", "{:,}"),
            ("size on disk (MB)", "size_mb", "{:.2f}"), ("compressed, zlib -1 (MB)", "compressed_mb", "{:.2f}"),
            ("latency batch 1 (ms)", "latency_ms_batch1", "{:.2f}"),
            ("latency batch 32 (ms)", "latency_ms_batch32", "{:.2f}")]
    for label, key, form in rows:
        change = f"{100 * (after[key] / before[key] - 1):+.1f} %" if before[key] else "-"
        lines.append(f"| {label} | {form.format(before[key])} | {form.format(after[key])} | {change} |")
    for split in ("validation", "test"):
        for name, value in (before.get(split) or {}).items():
            new = after[split][name]
            lines.append(f"| {split} {name} | {value:.4f} | {new:.4f} | {new - value:+.4f} |")
    return "\n".join(lines) + "\n"


def prune_after_training(result: RunResult, recipe: Recipe) -> RunResult:
    """The recipe's ``prune:`` section: prune the best model into RUN_DIR/pruned, whose metrics
    become the run's (``unpruned`` keeps the original ones, ``prune`` the report)."""
    output = result.run_dir / "pruned"
    report = prune_run(result.run_dir, recipe.prune, output, overwrite=True)
    # training statistics (seconds, steps, tokens) stay those of the run; the scores are the pruned model's
    metrics = {**result.metrics, "validation": report["after"]["validation"], "unpruned": result.metrics,
               "prune": report}
    metrics.pop("test", None)
    if report["after"].get("test") is not None:
        metrics["test"] = report["after"]["test"]
    return RunResult(run_dir=output, metrics=metrics, best_step=result.best_step,
                     best_checkpoint=result.best_checkpoint, history=result.history)


# --- the command ------------------------------------------------------------------------------

FLAGS = {"method": "--method", "sparsity": "--sparsity", "heads_fraction": "--heads-fraction",
         "layers_kept": "--layers-kept", "layer_selection": "--layer-selection",
         "importance_samples": "--importance-samples", "finetune_epochs": "--finetune-epochs",
         "finetune_lr": "--finetune-lr"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="run folder to prune")
    parser.add_argument("--method", required=True, choices=["magnitude", "heads", "layers"])
    parser.add_argument("--sparsity", type=float, help="magnitude: fraction of linear weights zeroed (default 0.5)")
    parser.add_argument("--heads-fraction", type=float, help="heads: fraction of all heads removed (default 0.25)")
    parser.add_argument("--layers-kept", type=int, help="layers: encoder layers kept")
    parser.add_argument("--layer-selection", choices=["importance", "first"], help="layers: which (default importance)")
    parser.add_argument("--importance-samples", type=int, help="validation examples scoring heads/layers (default 512)")
    parser.add_argument("--finetune-epochs", type=float, help="recovery fine-tune epochs (default 0: none)")
    parser.add_argument("--finetune-lr", type=float, help="recovery learning rate (default: the run's train.lr)")
    parser.add_argument("--output", help="folder for the pruned run (default RUN_DIR/pruned-METHOD)")
    parser.add_argument("--overwrite", action="store_true", help="replace a pruned run already in --output")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides for data and recovery, e.g. data.max_eval_samples=500")


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """The flags as a PruneConfig: the same validation as a recipe's prune: section, named by flag.

    Raises:
        RecipeError: a value outside its range, or --method layers without --layers-kept.
    """
    given = {field: getattr(args, field) for field in FLAGS if getattr(args, field) is not None}
    try:
        return PruneConfig(**given)
    except ValidationError as err:
        lines = []
        for item in err.errors():
            field = str(item["loc"][0]) if item["loc"] else ""
            flag = FLAGS.get(field, "--method")
            shown = f" (got {item['input']!r})" if field else ""
            lines.append(f"{flag}: {item['msg'].removeprefix('Value error, ')}{shown}")
        raise RecipeError("\n  ".join(lines)) from None


def command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if not log.handlers:  # the training loop sets up logging; a bare command gets plain console lines
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    output = Path(args.output) if args.output else Path(args.model) / f"pruned-{cfg.method}"
    report = prune_run(args.model, cfg, output, args.overrides, overwrite=args.overwrite)
    print(report_table(report))
    print(json.dumps({"pruned_run": str(output), "report": str(output / "prune_report.json")}))
    return 0
