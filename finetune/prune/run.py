"""The story of one pruning: load, measure, prune, recover, measure again, save a run folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune import runs
from finetune.config import PruneConfig, RecipeConfig, RecipeError
from finetune.inference import parameter_counts
from finetune.modeling import encoder_layers, head_count
from finetune.prune.measure import (
    Bench,
    evaluate_splits,
    importance_batches,
    measure,
    open_bench,
)
from finetune.prune.methods import (
    choose_heads,
    choose_layers,
    head_importance,
    heads_to_remove,
    keep_layers,
    magnitude_prune,
    make_permanent,
    prune_heads,
)
from finetune.prune.recovery import recover
from finetune.publish import export_model, write_model_card
from finetune.runs import RunResult, atomic_write_text, replace_dir

log = logging.getLogger("finetune")
LATENCY_REPEATS = 20


def check_single_process() -> None:
    """Pruning, its importance scores and the recovery fine-tune run in one process.

    Raises:
        RecipeError: started under several processes (``accelerate launch --num_processes N``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecipeError("prune: pruning runs in a single process, not under accelerate launch with several; "
                          "train without prune.method, then run `finetune prune --model RUN_DIR ...` in one process")



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
    """An adapter run's adapter merged into its base (pruning needs plain weights); others as they are."""
    from finetune.policies import plain

    return plain(model)


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
    bench = open_bench(recipe, run.tokenizer, run.labels)
    log.info("pruning %s: method %s%s", run_dir, cfg.method, " (adapter merged first)" if merged else "")
    before = {**measure(model, bench, run_dir, latency_repeats), **evaluate_splits(model, bench)}

    masked, details = apply_method(model, cfg, bench)
    recovery = (recover(model, recipe, cfg, output.with_name(f".{output.name}.recovery.tmp"))
                if cfg.finetune_epochs > 0 else None)
    model = bench.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if masked:
        details = make_permanent(masked)
        log.info("sparsity %.4f over %s weights", details["sparsity_reached"], f"{details['prunable_weights']:,}")
    after_metrics = evaluate_splits(model, bench)

    tmp = output.with_name(f".{output.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted prune
    tmp.mkdir(parents=True)
    export_model(model, run.tokenizer, run.labels, tmp, merge_lora=False, max_length=recipe.data.max_length)
    after = {**measure(model, bench, tmp, latency_repeats), **after_metrics}
    report = {"source": str(run_dir), "output": str(output), "config": cfg.model_dump(mode="json"),
              "lora_merged": merged, "details": details, "recovery": recovery,
              "latency": {"device": "cpu", "threads": torch.get_num_threads(), "repeats": latency_repeats,
                          "inputs": "validation split", "max_length": recipe.data.max_length},
              "before": before, "after": after, "seconds": round(time.perf_counter() - started, 1)}
    save_run_files(tmp, recipe, output, cfg, report, model)
    replace_dir(tmp, output)
    return report


def save_run_files(folder: Path, recipe: RecipeConfig, output: Path, cfg: PruneConfig, report: dict, model: nn.Module) -> None:
    """recipe.yaml (the run's, naming this folder and the pruning applied), metrics.json, model card
    and the report, beside the exported model."""
    recipe = recipe.with_overrides([])
    recipe.output.dir, recipe.prune = str(output), cfg
    atomic_write_text(folder / runs.RECIPE, recipe.to_yaml())
    metrics = {"validation": report["after"].get("validation"), "test": report["after"].get("test"),
               "unpruned": {split: report["before"][split] for split in ("validation", "test") if split in report["before"]}}
    atomic_write_text(folder / runs.METRICS, json.dumps(metrics, indent=2))
    atomic_write_text(folder / "prune_report.json", json.dumps(report, indent=2))
    table = report_table(report)
    atomic_write_text(folder / "prune_report.md", table)
    total = parameter_counts(model)["total"]
    write_model_card(recipe, folder, metrics, total, total, extra="## Pruning\n\n" + table)


def report_table(report: dict) -> str:
    """The before/after report as a markdown table."""
    before, after, cfg = report["before"], report["after"], report["config"]
    setting = {"magnitude": f"sparsity {cfg['sparsity']}", "heads": f"heads_fraction {cfg['heads_fraction']}",
               "layers": f"layers_kept {cfg['layers_kept']} ({cfg['layer_selection']})"}[cfg["method"]]
    recovery = report["recovery"]
    lines = [f"Pruning: {cfg['method']}, {setting}; recovery fine-tune: "
             + (f"{recovery['epochs']} epoch(s), lr {recovery['lr']:g}" if recovery else "none")
             + ("; adapter merged before pruning" if report["lora_merged"] else "") + ".",
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


def prune_after_training(result: RunResult, recipe: RecipeConfig) -> RunResult:
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


