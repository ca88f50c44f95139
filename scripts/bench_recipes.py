"""Benchmark shipped recipes: train each on its full training split, score it on the test split.

    python scripts/bench_recipes.py                      # the three SST-2 recipes -> benchmarks/sst2_recipes.{json,md}
    python scripts/bench_recipes.py --recipes trec_minilm_full,mrpc_minilm_lora --name other_recipes
    python scripts/bench_recipes.py --recipes sst2_minilm_head train.epochs=1     # overrides apply to every recipe
    python scripts/bench_recipes.py --recipes ""                                   # rewrite the summary only

Each recipe trains in its own process (so peak memory is that run's own). For SST-2 the test
split is the 872-sentence GLUE dev set. Results go to benchmarks/<name>.json and a markdown
table benchmarks/<name>.md, with the machine and the exact command; each recipe's own result is
kept in benchmarks/<name>/<recipe>.json as soon as it is measured.
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
    primary = recipe.eval.primary
    out.write_text(json.dumps({
        "recipe": name, "overrides": overrides, "run_dir": str(result.run_dir), "primary_metric": primary,
        "test": result.metrics.get("test", {}), "validation": result.metrics["validation"],
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


def markdown(title: str, results: list[dict], info: dict) -> str:
    commands = sorted({f"`{r['command']}` ({r['machine']['date']})" for r in results})
    lines = [
        f"# {title}", "",
        "Commands: " + "; ".join(commands) + "  ",
        f"Machine: {info['cores']} CPU cores ({info['cpu']}), Python {info['python']}, "
        f"torch {info['torch']} ({info['threads']} threads), no GPU", "",
        "| recipe | trainable params | epochs | lr | metric | test | validation (best) | train time | samples/s | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        metric = r["primary_metric"]
        test = f"{100 * r['test'][metric]:.2f} %" if metric in r["test"] else "-"
        lines.append(f"| {r['recipe']} | {r['trainable_parameters']:,} | {r['epochs']} | {r['lr']} | {metric} | {test} | "
                     f"{100 * r['validation'][metric]:.2f} % | {r['train_seconds'] / 60:.1f} min | "
                     f"{r['samples_per_second']:.0f} | {r['peak_rss_mb']:,} MB |")
    lines += [f"\n{r['recipe']}: {r['note']}" for r in results if r.get("note")]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(DEFAULT), help="comma-separated recipe names")
    parser.add_argument("--name", default="sst2_recipes", help="results file stem under --out-dir")
    parser.add_argument("--title", default="SST-2 recipes on all-MiniLM-L6-v2, full training split")
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
    # One file per recipe, kept as soon as it is measured; the summary covers every recipe measured so far.
    per_recipe = out_dir / args.name
    per_recipe.mkdir(parents=True, exist_ok=True)
    info = {**machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    for name in [n for n in args.recipes.split(",") if n]:  # --recipes "" only rewrites the summary
        out = per_recipe / f"{name}.json"
        overrides = [*args.overrides, f"output.dir={Path(args.runs_dir) / name}"]
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, __file__, "--child", name, str(out), *overrides], check=True)
        result = {**json.loads(out.read_text()), "command": command, "machine": info}
        out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result), flush=True)
    results = [json.loads(path.read_text()) for path in sorted(per_recipe.glob("*.json"))]
    table = markdown(args.title, results, info)
    (out_dir / f"{args.name}.json").write_text(json.dumps({"results": results}, indent=2))
    (out_dir / f"{args.name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
