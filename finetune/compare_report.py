"""What ``finetune compare`` writes: the curves' data, the summary table (Markdown and JSON) and the plots."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from finetune.config import RecipeConfig
from finetune.durable import atomic_write_text


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


def write_outputs(result: ComparisonResult, recipe: RecipeConfig, seeds: list[int], threshold: str | float,
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


def _budget(recipe: RecipeConfig) -> str:
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
