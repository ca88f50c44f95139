"""Compare variants of one recipe: transfer vs scratch, full vs LoRA (DoRA, IA3, BitFit) vs head-only, measured.

    finetune compare --recipe sst2_minilm_full --variants pretrained,scratch train.eval_every=25
    finetune compare --recipe sst2_minilm_full --variants full,lora,head_only,freeze --seeds 42,43
    finetune compare --recipe R --variants full,r4:policy.kind=lora,policy.lora.rank=4

Each variant is the recipe plus a few overrides, trained through the normal recipe path with the same
data, budget (epochs/steps, eval_every) and seeds as the others. From the runs' evaluation records
(``metrics.jsonl``) it draws learning curves (validation metric vs optimizer steps and vs training
seconds; mean over seeds with a min-max band) and a table: final and best metric, steps and seconds
to reach a threshold, test metric of the best checkpoint, trainable parameters, time and throughput.

    OUTPUT/
      curves_steps.png, curves_seconds.png
      summary.md, summary.json      the table, the curves' data and each variant's overrides
      recipes/<variant>.yaml        each variant's resolved recipe (its seed set per run)
      runs/<variant>-seed<k>/       the run folders (--runs-dir puts them elsewhere, e.g. out of a repository)

A run folder that already holds a finished run of the same recipe is reused, and an interrupted one is
resumed from its last checkpoint, so re-running the command after a crash loses nothing (--overwrite
retrains).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from finetune import runs
from finetune.compare_report import ComparisonResult, Curve, write_outputs
from finetune.config import RecipeConfig, RecipeError
from finetune.durable import atomic_write_text
from finetune.metrics import greater_is_better
from finetune.policies import POLICIES
from finetune.runs import output_home
from finetune.techniques import run_recipe

log = logging.getLogger("finetune")

# Learning rates for policies that train far fewer weights (``Policy.lr``); used when a preset changes the
# recipe's policy kind (a recipe already of that kind keeps its own, tuned lr).
PRESET_LR = {name: policy.lr for name, policy in POLICIES.items()}
PRESETS: dict[str, list[str]] = {
    "pretrained": ["backbone.pretrained=true"],
    "scratch": ["backbone.pretrained=false"],
    # freeze: + the first half of the layers (resolve_variant)
    **{name: [f"policy.kind={name}", *policy.preset] for name, policy in POLICIES.items()},
}
NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class Variant:
    name: str
    overrides: list[str]
    """Applied to the recipe after the preset's lr (PRESET_LR), so a variant's own train.lr=... wins."""


# --- variants -----------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so ``policy.lora.target_modules=[query,value]`` stays whole."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [p for p in [*parts, current.strip()] if p]


def parse_variants(text: str) -> list[Variant]:
    """``pretrained,scratch`` or ``full,r4:policy.kind=lora,policy.lora.rank=4``: presets by name, or
    ``NAME:key=value,...`` (a preset's name there adds overrides to that preset).

    Raises:
        RecipeError: unknown or repeated name, a bad name, or fewer than one variant.
    """
    variants: list[Variant] = []
    takes_more = False  # the previous part was NAME:key=value, so bare key=value parts continue it
    for part in _split_top_level(text):
        if "=" in part and ":" not in part.split("=", 1)[0]:
            if not takes_more:
                raise RecipeError(f"--variants: {part!r} must follow NAME:key=value (e.g. r4:policy.lora.rank=4)")
            variants[-1].overrides.append(part)
            continue
        name, _, first = part.partition(":")
        if not NAME.fullmatch(name):
            raise RecipeError(f"--variants: {name!r} is not a usable name (letters, digits, _ . -)")
        if name not in PRESETS and not first:
            raise RecipeError(f"--variants: unknown variant {name!r}; known: {', '.join(PRESETS)}, "
                              "or NAME:key=value,... for your own")
        if any(v.name == name for v in variants):
            raise RecipeError(f"--variants: {name!r} appears twice; give each variant its own name")
        variants.append(Variant(name, list(PRESETS.get(name, [])) + ([first] if first else [])))
        takes_more = bool(first)
    if not variants:
        raise RecipeError("--variants: name at least one variant, e.g. pretrained,scratch")
    return variants


def resolve_variant(base: RecipeConfig, variant: Variant, keep_lr: bool = False) -> tuple[RecipeConfig, list[str]]:
    """The variant's recipe and the overrides that make it from ``base``.

    Raises:
        RecipeError: an override is invalid for this recipe.
    """
    overrides = []
    kinds = [o.split("=", 1)[1] for o in variant.overrides if o.startswith("policy.kind=")]
    kind = kinds[-1] if kinds else None
    if kind in PRESET_LR and kind != base.policy.kind and not keep_lr:
        overrides.append(f"train.lr={PRESET_LR[kind]}")
    if kind == "freeze" and not any(o.startswith("policy.freeze_layers=") for o in variant.overrides):
        overrides.append(f"policy.freeze_layers={max(1, _num_layers(base) // 2)}")
    if kind is not None and kind != "freeze":  # settings of another kind would be refused by the recipe
        overrides += ["policy.freeze_embeddings=false", "policy.freeze_layers=0"]
    overrides += variant.overrides
    try:
        return base.with_overrides(overrides), overrides
    except RecipeError as err:
        raise RecipeError(f"variant {variant.name}: {err}") from None


def _num_layers(recipe: RecipeConfig) -> int:
    from transformers import AutoConfig

    from finetune.backbones import resolve_backbone

    if recipe.backbone.num_layers:
        return recipe.backbone.num_layers
    config = AutoConfig.from_pretrained(resolve_backbone(recipe.backbone),
                                        trust_remote_code=recipe.backbone.trust_remote_code)
    return config.num_hidden_layers


# --- thresholds and curves (pure) ---------------------------------------------------------


def parse_threshold(text: str | float) -> tuple[str, float]:
    """``95%`` (relative to the best variant's best value) or an absolute metric value."""
    text = str(text).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1]) / 100
            if not 0 < share <= 1:
                raise ValueError
            return "relative", share
        return "absolute", float(text)
    except ValueError:
        raise RecipeError(f"--threshold: {text!r} is neither a percentage in (0, 100]% nor a number") from None


def threshold_value(kind: str, value: float, best: float, greater: bool) -> float:
    """The metric value to reach. Relative: ``value`` of the best for higher-is-better metrics, or
    as much above the best for lower-is-better ones (95% of a loss of 0.30 is 0.315)."""
    if kind == "absolute":
        return value
    return best * value if greater else best * (2 - value)


def time_to_reach(steps: list[int], seconds: list[float], values: list[float], threshold: float,
                  greater: bool) -> tuple[int, float] | None:
    """(step, seconds) of the first evaluation at or beyond ``threshold`` (>= when higher is better,
    <= for losses), or None when never reached."""
    for step, second, value in zip(steps, seconds, values):
        if not math.isnan(value) and (value >= threshold if greater else value <= threshold):
            return step, second
    return None


def mean_curve(histories: list[list[dict]], metric: str, offsets: list[float]) -> Curve:
    """Average seeds at the evaluation steps they all share (early stopping may end one sooner)."""
    by_step = [{r["step"]: r for r in history} for history in histories]
    steps = sorted(set.intersection(*(set(s) for s in by_step)))
    values = [[runs[s][metric] for runs in by_step] for s in steps]
    seconds = [sum(runs[s]["train_seconds"] + off for runs, off in zip(by_step, offsets)) / len(by_step) for s in steps]
    return Curve(steps=steps, seconds=[round(s, 2) for s in seconds], mean=[sum(v) / len(v) for v in values],
                 low=[min(v) for v in values], high=[max(v) for v in values])


# --- running ------------------------------------------------------------------------------


def _same_training(saved: RecipeConfig, wanted: RecipeConfig) -> bool:
    a, b = saved.to_dict(), wanted.to_dict()
    a.pop("output"), b.pop("output")
    if wanted.head.pooling == "auto":  # the loop writes the pooling it resolved
        a["head"].pop("pooling"), b["head"].pop("pooling")
    return a == b


def run_variant(recipe: RecipeConfig, run_dir: Path, overwrite: bool) -> tuple[list[dict], dict]:
    """Train (or reuse, or resume) one run; returns its evaluation records and final metrics.

    Raises:
        RecipeError: the folder holds a run of a different recipe (and overwrite is off).
    """
    recipe = recipe.with_overrides([f"output.dir={run_dir}"])
    saved = run_dir / runs.RECIPE
    if saved.is_file() and not overwrite:
        if not _same_training(RecipeConfig.from_yaml(saved), recipe):
            raise RecipeError(f"{run_dir} holds a run of a different recipe; pass --overwrite to retrain it, "
                              "or choose another --output/--runs-dir")
        if (run_dir / runs.METRICS).is_file():
            log.info("reusing the finished run in %s", run_dir)
        else:
            resumable = (run_dir / runs.CHECKPOINT).is_dir()
            log.info("%s %s", "resuming" if resumable else "restarting", run_dir)
            run_recipe(recipe, resume=resumable, overwrite=not resumable)
    else:
        log.info("training %s", run_dir)
        run_recipe(recipe, overwrite=overwrite)
    history = [json.loads(line) for line in (run_dir / runs.HISTORY).read_text().splitlines() if line]
    return history, json.loads((run_dir / runs.METRICS).read_text())


def compare(recipe: RecipeConfig, variants: list[Variant] | str, output_dir: str | Path | None = None,
            seeds: list[int] | None = None, threshold: str | float = "95%", metric: str | None = None,
            runs_dir: str | Path | None = None, overwrite: bool = False, keep_lr: bool = False,
            command_line: str | None = None) -> ComparisonResult:
    """Train every variant for every seed, then write curves and the summary; see the module docstring.
    ``command_line`` is recorded in the summary, so a results folder says how to reproduce it.

    Raises:
        RecipeError: bad variants, seeds, threshold or metric, or a variant the recipe cannot take.
    """
    variants = parse_variants(variants) if isinstance(variants, str) else variants
    seeds = seeds or [recipe.train.seed]
    if len(set(seeds)) != len(seeds):
        raise RecipeError(f"--seeds: repeated seed in {seeds}")
    metric = metric or recipe.eval.primary
    if metric != "loss" and metric not in recipe.eval.metrics:
        raise RecipeError(f"--metric: {metric!r} is not evaluated; use 'loss' or one of {recipe.eval.metrics}")
    kind, value = parse_threshold(threshold)
    greater = greater_is_better(metric)
    output_dir = Path(output_dir or output_home() / "runs" / f"compare-{recipe.name}-{datetime.now():%Y%m%d-%H%M%S}")
    runs_dir = Path(runs_dir) if runs_dir else output_dir / "runs"
    resolved = {v.name: resolve_variant(recipe, v, keep_lr) for v in variants}  # all checked before training
    if recipe.train.eval_every == "epoch":
        log.warning("train.eval_every=epoch: one curve point per epoch; pass train.eval_every=N for finer curves")

    main = os.environ.get("RANK", "0") == "0"  # under accelerate launch, every process trains; one writes
    if main:
        (output_dir / "recipes").mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[tuple[list[dict], dict]]] = {}
    for variant in variants:
        variant_recipe, _ = resolved[variant.name]
        if main:
            atomic_write_text(output_dir / "recipes" / f"{variant.name}.yaml", variant_recipe.to_yaml())
        runs[variant.name] = [run_variant(variant_recipe.with_overrides([f"train.seed={seed}"]),
                                          runs_dir / f"{variant.name}-seed{seed}", overwrite) for seed in seeds]

    for name, done in runs.items():
        if len(done[0][0]) < 3:
            log.warning("variant %s has %d evaluation(s): too few for a curve; evaluate more often "
                        "(train.eval_every=N)", name, len(done[0][0]))
    # head_only's feature pass is part of what it costs to train (near 0 when an earlier run cached them)
    curves = {name: mean_curve([h for h, _ in done], metric, [m.get("feature_cache_seconds", 0.0) for _, m in done])
              for name, done in runs.items()}
    bests = [(max if greater else min)(c.mean) for c in curves.values() if c.mean]
    target = threshold_value(kind, value, (max if greater else min)(bests), greater) if bests else math.nan
    rows = [_row(name, *resolved[name], curves[name], done, metric, target, greater) for name, done in runs.items()]
    result = ComparisonResult(output_dir=output_dir, recipe=recipe.name, metric=metric, threshold=target, rows=rows,
                              curves=curves)
    if main:
        write_outputs(result, recipe, seeds, threshold, command_line)
    return result


def _row(name: str, recipe: RecipeConfig, overrides: list[str], curve: Curve, done: list[tuple[list[dict], dict]],
         metric: str, target: float, greater: bool) -> dict[str, Any]:
    finals = [m for _, m in done]
    best_at = (max if greater else min)(range(len(curve.mean)), key=curve.mean.__getitem__)
    reached = time_to_reach(curve.steps, curve.seconds, curve.mean, target, greater)
    tests = [m.get("test", {}).get(metric) for m in finals]

    def mean(key: str) -> float:
        return round(sum(m[key] for m in finals) / len(finals), 2)

    return {"variant": name, "overrides": overrides, "policy": recipe.policy.kind,
            "pretrained": recipe.backbone.pretrained, "lr": recipe.train.lr, "evaluations": len(curve.steps),
            "final": curve.mean[-1], "best": curve.mean[best_at], "best_step": curve.steps[best_at],
            "steps_to_threshold": reached[0] if reached else None,
            "seconds_to_threshold": reached[1] if reached else None,
            "test": sum(tests) / len(tests) if None not in tests else None, "test_per_seed": tests,
            "trainable_parameters": finals[0]["trainable_parameters"],
            "total_parameters": finals[0]["total_parameters"],
            "optimizer_steps": finals[0]["optimizer_steps"], "train_seconds": mean("train_seconds"),
            "feature_cache_seconds": mean("feature_cache_seconds"), "samples_per_second": mean("samples_per_second")}


# --- the command --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe YAML file or shipped recipe name")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides for every variant, e.g. data.max_train_samples=2000 train.eval_every=50")
    parser.add_argument("--variants", required=True,
                        help=f"comma-separated: {', '.join(PRESETS)}, or NAME:key=value,... "
                             "(freeze = embeddings + first half of the layers)")
    parser.add_argument("--seeds", help="comma-separated train.seed values, each variant runs once per seed "
                                        "(default: the recipe's seed)")
    parser.add_argument("--threshold", default="95%", help="metric value to reach, or N%% of the best variant's "
                                                          "best (default 95%%; for loss: within 5%% of the best)")
    parser.add_argument("--metric", help="validation metric to plot and compare (default eval.primary; 'loss' allowed)")
    parser.add_argument("--output", help="folder for curves and summary (default $FINETUNE_HOME/runs/compare-<recipe>-<time>, or runs/... here)")
    parser.add_argument("--runs-dir", help="folder for the variants' run folders (default OUTPUT/runs)")
    parser.add_argument("--overwrite", action="store_true", help="retrain variants whose runs already exist")
    parser.add_argument("--keep-lr", action="store_true",
                        help="keep the recipe's train.lr for every policy (implied by a train.lr=... override; "
                             f"otherwise a policy preset that changes the recipe's policy kind sets its lr: "
                             f"{PRESET_LR})")


def command(args: argparse.Namespace) -> int:
    import recipes
    from finetune.processes import command_logging, end_processes

    command_logging(replace=False)  # each run sets up its own logging; until the first one, say what is reused
    from finetune.runs import check_output_folder

    recipe = recipes.load(args.recipe, *args.overrides)
    for flag, folder in {"--output": args.output, "--runs-dir": args.runs_dir}.items():
        if folder:
            check_output_folder(folder, flag)  # before the first variant trains, not after
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise RecipeError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    lr_given = any(o.split("=", 1)[0].strip() == "train.lr" for o in args.overrides)  # the user's lr wins
    compare(recipe, args.variants, args.output, seeds=seeds, threshold=args.threshold, metric=args.metric,
            runs_dir=args.runs_dir, overwrite=args.overwrite, keep_lr=args.keep_lr or lr_given,
            command_line=_command_line(args))
    end_processes()
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed (defaults spelled out), for the summary."""
    options = {"recipe": args.recipe, "variants": args.variants, "seeds": args.seeds, "threshold": args.threshold,
               "metric": args.metric, "output": args.output, "runs-dir": args.runs_dir}
    words = ["finetune", "compare"] + [f"--{k}={v}" for k, v in options.items() if v is not None]
    words += [f"--{k}" for k, on in {"overwrite": args.overwrite, "keep-lr": args.keep_lr}.items() if on]
    return shlex.join(words + list(args.overrides))
