"""Benchmark the SST-2 recipes (full, LoRA, head-only) on the full training split.

    python scripts/bench_recipes.py                      # all three, results in benchmarks/
    python scripts/bench_recipes.py --recipes sst2_minilm_head,sst2_minilm_lora train.epochs=1

Each recipe trains in its own process (so peak memory is that run's own), on all 60,614
SST-2 training rows, and is scored on the 872 test sentences (the GLUE dev set). Results
go to benchmarks/sst2_recipes.json and a markdown table benchmarks/sst2_recipes.md, with
the machine and the exact command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT = ["sst2_minilm_full", "sst2_minilm_lora", "sst2_minilm_head"]


def run_one(name: str, overrides: list[str], out: Path) -> None:
    """Child process: train one recipe, write its numbers to ``out``."""
    sys.path.insert(0, str(REPO))
    import recipes

    recipe = recipes.load(name, *overrides)
    started = time.perf_counter()
    result = recipe.run(overwrite=True)
    wall = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    out.write_text(json.dumps({
        "recipe": name, "overrides": overrides, "run_dir": str(result.run_dir),
        "test_accuracy": result.metrics["test"]["accuracy"],
        "validation_accuracy": result.metrics["validation"]["accuracy"],
        "best_step": result.best_step, "optimizer_steps": result.metrics["optimizer_steps"],
        "train_seconds": result.metrics["train_seconds"], "wall_seconds": round(wall, 1),
        "samples_per_second": result.metrics["samples_per_second"], "peak_rss_mb": round(peak_mb),
        "trainable_parameters": result.metrics["trainable_parameters"],
        "epochs": recipe.train.epochs, "lr": recipe.train.lr, "batch_size": recipe.train.batch_size,
    }, indent=2))


def machine() -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def markdown(results: list[dict], command: str, info: dict) -> str:
    lines = [
        "# SST-2 recipes on all-MiniLM-L6-v2 (full training split)", "",
        f"Command: `{command}`  ", f"Machine: {info['cores']} CPU cores ({info['cpu']}), Python {info['python']}, "
        f"torch {info['torch']} ({info['threads']} threads), no GPU  ", f"Date: {info['date']}", "",
        "| recipe | trainable params | epochs | lr | test acc (872) | val acc | train time | samples/s | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['recipe']} | {r['trainable_parameters']:,} | {r['epochs']} | {r['lr']} | "
                     f"{100 * r['test_accuracy']:.2f} % | {100 * r['validation_accuracy']:.2f} % | "
                     f"{r['train_seconds'] / 60:.1f} min | {r['samples_per_second']:.0f} | {r['peak_rss_mb']:,} MB |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(DEFAULT), help="comma-separated recipe names")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "bench"))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every recipe")
    parser.add_argument("--child", nargs=2, metavar=("NAME", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_one(args.child[0], args.overrides, Path(args.child[1]))
        return 0
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python scripts/bench_recipes.py " + " ".join(sys.argv[1:])
    results = []
    for name in args.recipes.split(","):
        out = out_dir / f".{name}.json"
        overrides = [*args.overrides, f"output.dir={Path(args.runs_dir) / name}"]
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, __file__, "--child", name, str(out), *overrides], check=True)
        results.append(json.loads(out.read_text()))
        out.unlink()
        print(json.dumps(results[-1]), flush=True)
    info = {**machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    (out_dir / "sst2_recipes.json").write_text(json.dumps({"command": command, "machine": info, "results": results}, indent=2))
    (out_dir / "sst2_recipes.md").write_text(markdown(results, command, info))
    print(markdown(results, command, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
