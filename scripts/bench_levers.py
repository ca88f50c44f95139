"""Measure each accuracy lever alone on SST-2: the same recipe, data and seed, one key changed.

    python scripts/bench_levers.py                                  # -> benchmarks/levers/
    python scripts/bench_levers.py --seeds 42,7 --rows 6000         # the defaults, spelled out
    python scripts/bench_levers.py --levers baseline,soup_greedy    # a subset (results accumulate)

Every lever trains sst2_minilm_full on the same seeded subsample of training rows, selects on the same
2,000 validation rows (evaluating every 100 steps, so soups have candidates), and is scored on the 872 test
sentences. Each run is its own process, one after another (two torch processes on two cores would slow both
many times). A run already measured (its json exists) is not trained again. The table gives each lever's
change against the baseline of the same seed, per seed and on average: on 872 sentences one sentence is
0.11 pt, and seeds alone move a result by about half a point, so a lever is called helpful only when it
helps on every seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recipes import REPO, machine, run_one  # noqa: E402

RECIPE = "sst2_minilm_full"
LEVERS: dict[str, list[str]] = {
    "baseline": [],
    "layer_lr_decay_0.8": ["train.layer_lr_decay=0.8"],
    "label_smoothing_0.1": ["train.label_smoothing=0.1"],
    "reinit_top_layer": ["backbone.reinit_layers=1"],
    "soup_uniform": ["train.soup=uniform"],
    "soup_greedy": ["train.soup=greedy"],
    "cosine_5_epochs": ["train.scheduler=cosine", "train.epochs=5"],
}


def markdown(results: list[dict], command: str, info: dict) -> str:
    seeds = sorted({r["seed"] for r in results})
    base = {r["seed"]: r for r in results if r["lever"] == "baseline"}
    lines = ["# Accuracy levers on SST-2, each alone", "",
             f"Command: `{command}` ({info['date']})  ",
             f"Machine: {info['cores']} CPU cores ({info['cpu']}), Python {info['python']}, torch {info['torch']}, "
             "no GPU  ",
             f"Data: {results[0]['rows']:,} training rows (seeded subsample), 2,000 validation rows, the 872 test "
             "sentences; all-MiniLM-L6-v2, full fine-tune, 3 epochs, lr 1e-4, evaluation every 100 steps.", "",
             "| lever | overrides | " + " | ".join(f"test seed {s}" for s in seeds) + " | mean test | mean change "
             "vs baseline | validation (mean) | train time (mean) |",
             "|---|---|" + "---|" * len(seeds) + "---|---|---|---|"]
    for lever in LEVERS:
        runs = {r["seed"]: r for r in results if r["lever"] == lever}
        if not runs:
            continue
        tests = [100 * runs[s]["test"]["accuracy"] if s in runs else None for s in seeds]
        changes = [t - 100 * base[s]["test"]["accuracy"] for s, t in zip(seeds, tests) if t is not None and s in base]
        shown = [f"{t:.2f}" if t is not None else "-" for t in tests]
        measured = [t for t in tests if t is not None]
        mean_test = sum(measured) / len(measured)
        change = (f"{sum(changes) / len(changes):+.2f} ({', '.join(f'{c:+.2f}' for c in changes)})"
                  if changes and lever != "baseline" else "")
        validation = sum(100 * r["validation"]["accuracy"] for r in runs.values()) / len(runs)
        minutes = sum(r["train_seconds"] for r in runs.values()) / len(runs) / 60
        soup = [r["soup"] for r in runs.values() if r.get("soup")]
        kept = f" (soup kept in {sum(s['kept'] for s in soup)}/{len(soup)})" if soup else ""
        lines.append(f"| {lever}{kept} | {' '.join(LEVERS[lever]) or '-'} | " + " | ".join(shown) +
                     f" | {mean_test:.2f} | {change} | {validation:.2f} | {minutes:.1f} min |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levers", default=",".join(LEVERS), help="comma-separated, from: " + ", ".join(LEVERS))
    parser.add_argument("--seeds", default="42,7")
    parser.add_argument("--rows", type=int, default=6000, help="training rows (seeded subsample)")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "levers"))
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "levers"))
    parser.add_argument("--child", nargs=2, metavar=("LEVER", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_one(RECIPE, args.overrides, Path(args.child[1]))
        return 0
    unknown = [lever for lever in args.levers.split(",") if lever not in LEVERS]
    if unknown:
        parser.error(f"unknown lever {unknown[0]!r}; choose from {', '.join(LEVERS)}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python scripts/bench_levers.py " + " ".join(sys.argv[1:])
    info = {**machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    common = [f"data.max_train_samples={args.rows}", "data.max_eval_samples=2000", "train.eval_every=100"]
    for seed in [int(s) for s in args.seeds.split(",")]:
        for lever in args.levers.split(","):
            out = out_dir / f"{lever}-seed{seed}.json"
            if out.exists():
                continue
            overrides = [*common, f"train.seed={seed}", *LEVERS[lever],
                         f"output.dir={Path(args.runs_dir) / f'{lever}-seed{seed}'}"]
            print(f"== {lever} seed {seed}", flush=True)
            subprocess.run([sys.executable, __file__, "--child", lever, str(out), *overrides], check=True)
            metrics = json.loads((Path(args.runs_dir) / f"{lever}-seed{seed}" / "metrics.json").read_text())
            result = {**json.loads(out.read_text()), "lever": lever, "seed": seed, "rows": args.rows,
                      "soup": metrics.get("soup"), "command": command, "machine": info}
            out.write_text(json.dumps(result, indent=2))
            print(f"   test {result['test']['accuracy']:.4f}  validation {result['validation']['accuracy']:.4f}",
                  flush=True)
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*-seed*.json"))]
    table = markdown(results, command, info)
    (out_dir / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
