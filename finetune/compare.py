"""Compare variants of one recipe: transfer vs scratch, full vs LoRA vs head-only, measured.

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
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from finetune import loop
from finetune.config import Recipe, RecipeError
from finetune.metrics import greater_is_better
from finetune.runs import atomic_write_text

log = logging.getLogger("finetune")

# Learning rates for policies that train far fewer weights; used when a preset changes the recipe's
# policy kind (a recipe already of that kind keeps its own, tuned lr). Values of the shipped recipes.
PRESET_LR = {"full": 1e-4, "freeze": 1e-4, "lora": 1e-3, "head_only": 5e-3}
PRESETS: dict[str, list[str]] = {
    "pretrained": ["backbone.pretrained=true"],
    "scratch": ["backbone.pretrained=false"],
    "full": ["policy.kind=full"],
    "lora": ["policy.kind=lora"],
    "head_only": ["policy.kind=head_only"],
    "freeze": ["policy.kind=freeze", "policy.freeze_embeddings=true"],  # + the first half of the layers
}
NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class Variant:
    name: str
    overrides: list[str]
    """Applied to the recipe after the preset's lr (PRESET_LR), so a variant's own train.lr=... wins."""


@dataclass
class Curve:
    """One variant's validation curve: mean over seeds and the min-max band, per evaluation step."""
    steps: list[int]
    seconds: list[float]
    """Mean training seconds at each evaluation (evaluation excluded; head_only's feature pass included)."""
    mean: list[float]
    low: list[float]
    high: list[float]


@dataclass
class ComparisonResult:
    output_dir: Path
    recipe: str
    """The compared recipe's name."""
    metric: str
    threshold: float
    rows: list[dict[str, Any]]
    """One summary row per variant, as in summary.json."""
    curves: dict[str, Curve] = field(default_factory=dict)
    """The plotted series, by variant name."""


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


def resolve_variant(base: Recipe, variant: Variant, keep_lr: bool = False) -> tuple[Recipe, list[str]]:
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


def _num_layers(recipe: Recipe) -> int:
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


def _same_training(saved: Recipe, wanted: Recipe) -> bool:
    a, b = saved.to_dict(), wanted.to_dict()
    a.pop("output"), b.pop("output")
    if wanted.head.pooling == "auto":  # the loop writes the pooling it resolved
        a["head"].pop("pooling"), b["head"].pop("pooling")
    return a == b


def run_variant(recipe: Recipe, run_dir: Path, overwrite: bool) -> tuple[list[dict], dict]:
    """Train (or reuse, or resume) one run; returns its evaluation records and final metrics.

    Raises:
        RecipeError: the folder holds a run of a different recipe (and overwrite is off).
    """
    recipe = recipe.with_overrides([f"output.dir={run_dir}"])
    saved = run_dir / "recipe.yaml"
    if saved.is_file() and not overwrite:
        if not _same_training(Recipe.from_yaml(saved), recipe):
            raise RecipeError(f"{run_dir} holds a run of a different recipe; pass --overwrite to retrain it, "
                              "or choose another --output/--runs-dir")
        if (run_dir / "metrics.json").is_file():
            log.info("reusing the finished run in %s", run_dir)
        else:
            resumable = (run_dir / "checkpoints" / "last").is_dir()
            log.info("%s %s", "resuming" if resumable else "restarting", run_dir)
            loop.run_recipe(recipe, resume=resumable, overwrite=not resumable)
    else:
        log.info("training %s", run_dir)
        loop.run_recipe(recipe, overwrite=overwrite)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return history, json.loads((run_dir / "metrics.json").read_text())


def compare(recipe: Recipe, variants: list[Variant] | str, output_dir: str | Path | None = None,
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
    greater = metric != "loss" and greater_is_better(metric)
    output_dir = Path(output_dir or f"runs/compare-{recipe.name}-{datetime.now():%Y%m%d-%H%M%S}")
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


def _row(name: str, recipe: Recipe, overrides: list[str], curve: Curve, done: list[tuple[list[dict], dict]],
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


# --- outputs ------------------------------------------------------------------------------


def write_outputs(result: ComparisonResult, recipe: Recipe, seeds: list[int], threshold: str | float,
                  command_line: str | None = None) -> None:
    """curves_steps.png, curves_seconds.png, summary.md and summary.json; prints the table."""
    out = result.output_dir
    for axis in ("steps", "seconds"):
        plot_curves(result, axis, out / f"curves_{axis}.png")
    table = markdown_table(result)
    seeds_text = ", ".join(map(str, seeds))
    spread = " (mean over seeds; band: min-max)" if len(seeds) > 1 else ""
    text = (f"# Compare: {recipe.name}\n\nValidation {result.metric} of each variant{spread}; seeds {seeds_text}; "
            f"same data and budget ({_budget(recipe)}). Threshold {result.threshold:.4f} "
            f"({threshold}{' of the best variant' if str(threshold).endswith('%') else ''}); seconds are training "
            "seconds (evaluation excluded, head_only's feature pass included). Recipes: recipes/<variant>.yaml.\n\n"
            + (f"    {command_line}\n\n" if command_line else "")
            + f"Machine: {_machine()}.\n\n"
            f"{table}\n\n![vs steps](curves_steps.png)\n\n![vs seconds](curves_seconds.png)\n")
    atomic_write_text(out / "summary.md", text)
    summary = {"recipe": recipe.name, "metric": result.metric, "threshold": result.threshold,
               "threshold_setting": str(threshold), "seeds": seeds, "command": command_line, "machine": _machine(),
               "date": datetime.now().isoformat(timespec="seconds"), "rows": result.rows,
               "curves": {name: asdict(curve) for name, curve in result.curves.items()}}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    print(table, flush=True)
    print(f"curves and summary: {out}", flush=True)


def _machine() -> str:
    import platform

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return f"{platform.machine()} {device}, torch {torch.__version__}"


def _budget(recipe: Recipe) -> str:
    cfg = recipe.train
    length = f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.epochs:g} epochs"
    rows = f", {recipe.data.max_train_samples} training rows" if recipe.data.max_train_samples else ""
    return f"{length}{rows}, batch {cfg.batch_size}, eval every {cfg.eval_every}"


def markdown_table(result: ComparisonResult) -> str:
    def number(value, digits: int = 4) -> str:
        return "never" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else f"{value:,}"

    m = result.metric
    header = (f"| variant | final {m} | best {m} | best step | steps to {result.threshold:.4f} | seconds to it | "
              f"test {m} | trainable params | train s | feature pass s | samples/s | lr |")
    lines = [header, "|---" * 12 + "|"]
    for r in result.rows:
        lines.append(f"| {r['variant']} | {number(r['final'])} | {number(r['best'])} | {r['best_step']} | "
                     f"{number(r['steps_to_threshold'])} | {number(r['seconds_to_threshold'], 1)} | "
                     f"{'' if r['test'] is None else number(r['test'])} | {number(r['trainable_parameters'])} | "
                     f"{number(r['train_seconds'], 1)} | {number(r['feature_cache_seconds'], 1)} | "
                     f"{number(r['samples_per_second'], 1)} | {r['lr']:g} |")
    return "\n".join(lines)


def plot_curves(result: ComparisonResult, axis: str, path: Path) -> None:
    """One line per variant (mean over seeds, min-max band) and the threshold as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(8, 5))
    for name, curve in result.curves.items():
        x = curve.steps if axis == "steps" else curve.seconds
        (line,) = ax.plot(x, curve.mean, marker="o", markersize=3, label=name)
        if curve.low != curve.high:
            ax.fill_between(x, curve.low, curve.high, color=line.get_color(), alpha=0.2)
    if not math.isnan(result.threshold):
        ax.axhline(result.threshold, color="grey", linestyle="--", linewidth=1, label="threshold")
    ax.set_xlabel("optimizer steps" if axis == "steps" else "training seconds (evaluation excluded)")
    ax.set_ylabel(f"validation {result.metric}")
    ax.set_title(f"{result.recipe}: {', '.join(result.curves)}")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    os.replace(tmp, path)


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
    parser.add_argument("--output", help="folder for curves and summary (default runs/compare-<recipe>-<time>)")
    parser.add_argument("--runs-dir", help="folder for the variants' run folders (default OUTPUT/runs)")
    parser.add_argument("--overwrite", action="store_true", help="retrain variants whose runs already exist")
    parser.add_argument("--keep-lr", action="store_true",
                        help="keep the recipe's train.lr for every policy (implied by a train.lr=... override; "
                             f"otherwise a policy preset that changes the recipe's policy kind sets its lr: "
                             f"{PRESET_LR})")


def command(args: argparse.Namespace) -> int:
    import recipes
    from finetune.processes import LOG_FORMAT, end_processes

    if not log.handlers:  # each run sets up its own logging; until the first one, say what is reused
        handler = logging.StreamHandler()
        handler.setFormatter(LOG_FORMAT)
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    from finetune.runs import check_output_folder

    recipe = Recipe.from_yaml(recipes.recipe_path(args.recipe), overrides=args.overrides)
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
