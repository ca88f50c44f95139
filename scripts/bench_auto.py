"""``finetune auto`` against the shipped recipe it starts from, side by side in one invocation.

    python scripts/bench_auto.py --recipe trec_minilm_full --budget 25m
    python scripts/bench_auto.py --recipe agnews_minilm_lora --budget 25m --seed 1

1. The shipped recipe, trained as shipped, scored on its test split (wall time measured). --seed S > 0 moves
   train.seed by S on both sides (and seeds auto's sampler), so repeats vary the shipped model too.
2. ``finetune auto`` on the same recipe (search + greedy ensemble within --budget), its best single model
   and its ensemble scored on the same test split, each with a 95 % bootstrap interval.

Both train on the recipe's own data; test chose nothing in either. Results go to
benchmarks/auto/<recipe>-seed<S>/: results.json, results.md, and auto's report, curve and trials table.
The run folders stay under --work-dir (runs/, not committed). One torch process at a time: run nothing
else on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))  # first: scripts/finetune.py must not shadow the package
from bench_recipes import machine  # noqa: E402


def seeded(name: str, seed: int, *overrides: str):
    """The shipped recipe with train.seed moved by --seed (seed 0: as shipped), so both sides vary with it."""
    import recipes

    recipe = recipes.load(name, *overrides)
    return recipes.load(name, *overrides, f"train.seed={recipe.train.seed + seed}") if seed else recipe


def shipped(name: str, seed: int, work: Path) -> dict:
    recipe = seeded(name, seed, f"output.dir={work / 'shipped'}")
    started = time.perf_counter()
    result = recipe.run(overwrite=True)
    return {"seconds": round(time.perf_counter() - started, 1), "metric": recipe.eval.primary,
            "validation": result.metrics["validation"], "test": result.metrics["test"]}


def auto(name: str, budget: str, seed: int, work: Path) -> dict:
    recipe = seeded(name, seed)
    folder = work / "auto"
    if folder.exists():
        shutil.rmtree(folder)  # a benchmark measures one fresh job, not a resumed one
    started = time.perf_counter()
    result = recipe.auto(budget, dir=str(folder), seed=seed)
    return {"seconds": round(time.perf_counter() - started, 1), "summary": result.summary, "folder": str(folder)}


def markdown(results: dict) -> str:
    metric, base, job = results["metric"], results["shipped"], results["auto"]["summary"]
    single, bag = job["best_single"], job["ensemble"]

    def pct(value):
        return f"{100 * value:.2f} %"

    def interval(ci):
        return f" [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else ""

    rows = [f"| shipped recipe, as shipped | {pct(base['validation'][metric])} | {pct(base['test'][metric])} | "
            f"{base['seconds'] / 60:.1f} min |",
            f"| auto: best single model (trial {single['trial']}) | {pct(single['validation_metrics'][metric])} | "
            f"{pct(single['test_metrics'][metric])}{interval(single.get('test_ci95'))} | "
            f"{results['auto']['seconds'] / 60:.1f} min (whole job) |"]
    if "skipped" not in bag:
        rows.append(f"| auto: greedy ensemble of {len(bag['members'])} | {pct(bag['validation_metrics'][metric])} | "
                    f"{pct(bag['test_metrics'][metric])}{interval(bag.get('test_ci95'))} | same job |")
    info = results["machine"]
    counts = ", ".join(f"{n} {state}" for state, n in job["trials"].items() if n)
    return "\n".join([
        f"# finetune auto vs the shipped {results['recipe']}", "",
        f"Command: `{results['command']}` ({info['date']})  ",
        f"Machine: {info['cores']} CPU cores ({info['cpu']}), Python {info['python']}, torch {info['torch']} "
        f"({info['threads']} threads), no GPU", "",
        f"| model | validation {metric} | test {metric} (95 % bootstrap interval) | wall time |", "|---|---|---|---|",
        *rows, "",
        f"Budget {job['budget_seconds'] / 60:.0f} min; the job took {job['total_seconds'] / 60:.1f} min "
        f"({'within' if job['within_budget'] else 'over'} budget + 5 %): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in job["phases_seconds"].items()) + f". Trials: {counts}.",
        f"Best single model's settings: {' '.join(single['settings'])}.",
        "Validation chose the trials and the ensemble; test chose nothing. auto's own report: "
        "[auto_report.md](auto_report.md), curve: [best_so_far.png](best_so_far.png), trials: "
        "[trials.csv](trials.csv).", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--budget", default="25m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "auto"))
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "auto-bench"))
    args = parser.parse_args()
    work = Path(args.work_dir) / f"{args.recipe}-seed{args.seed}"
    out = Path(args.out_dir) / f"{args.recipe}-seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    results = {"recipe": args.recipe, "budget": args.budget, "seed": args.seed,
               "command": "python " + " ".join(["scripts/bench_auto.py", *sys.argv[1:]]),
               "machine": {**machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}}
    results["shipped"] = shipped(args.recipe, args.seed, work)
    results["metric"] = results["shipped"]["metric"]
    print(json.dumps({"shipped": results["shipped"]}), flush=True)
    results["auto"] = auto(args.recipe, args.budget, args.seed, work)
    folder = Path(results["auto"]["folder"])
    report = (folder / "auto" / "report.md").read_text().replace("../report/report.md", "trials.csv")
    (out / "auto_report.md").write_text(report)
    shutil.copy(folder / "auto" / "best_so_far.png", out / "best_so_far.png")
    shutil.copy(folder / "report" / "trials.csv", out / "trials.csv")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(markdown(results), flush=True)


if __name__ == "__main__":
    main()
