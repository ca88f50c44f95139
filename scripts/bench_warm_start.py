"""Does a sweep warm-started from an earlier sweep reach the earlier best in fewer trials than a cold one?

    python scripts/bench_warm_start.py --output benchmarks/warm_start
    python scripts/bench_warm_start.py --output /tmp/ws --trials 4 --seeds 1 data.max_train_samples=500

One invocation runs, on the same recipe and search space (benchmarks/warm_start/sweep.yaml):
  1. the *earlier* sweep (sampler seed 0, train.seed 42), ``--earlier-trials`` trials;
  2. for each sampler seed in ``--seeds``: a *cold* sweep and a sweep *warm-started* from the earlier
     one (``sweep.warm_start``), both with ``--trials`` trials and another training seed (43), so the
     warm sweep's first trial re-trains the earlier best rather than replaying its number.
It reports, per sweep, the best-so-far validation value after each trial, and the number of trials each
needs to reach the earlier best (and the earlier best - 0.5 pt); mean over seeds. Writes
OUTPUT/results.json, OUTPUT/results.md (machine and command) and OUTPUT/best_so_far.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_ensemble import machine  # noqa: E402

SWEEP_FILE = REPO / "benchmarks" / "warm_start" / "sweep.yaml"


def run(sweep_dir: Path, overrides: list[str]) -> dict:
    """One sweep; its trials' values in the order they ran (this sweep's own trials only)."""
    from finetune.sweep.config import load_sweep_file
    from finetune.sweep.runner import run_sweep

    recipe, cfg = load_sweep_file(SWEEP_FILE, [*overrides, f"sweep.dir={sweep_dir}"])
    started = time.monotonic()
    result = run_sweep(recipe, cfg)
    rows = sorted(result.trials, key=lambda r: r["number"])
    return {"values": [r["value"] for r in rows], "overrides": [r["overrides"] for r in rows],
            "best": result.best_value, "seconds": round(time.monotonic() - started, 1)}


def best_so_far(values: list[float | None]) -> list[float | None]:
    out, best = [], None
    for value in values:
        if value is not None:
            best = value if best is None else max(best, value)
        out.append(best)
    return out


def trials_to_reach(values: list[float | None], target: float) -> int | None:
    """1-based number of the first trial at or above ``target``; None if never."""
    return next((i + 1 for i, v in enumerate(values) if v is not None and v >= target - 1e-12), None)


def plot(results: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, color in (("cold", "tab:blue"), ("warm", "tab:orange")):
        for i, seed in enumerate(results["seeds"]):
            curve = best_so_far(results["sweeps"][kind][str(seed)]["values"])
            ax.plot(range(1, len(curve) + 1), [c * 100 if c is not None else None for c in curve], color=color,
                    alpha=0.8, marker="o", markersize=3,
                    label=f"{kind} (one line per sampler seed; lines may overlap)" if i == 0 else None)
    target = results["earlier"]["best"] * 100
    ax.axhline(target, color="gray", linestyle="--", label=f"earlier best {target:.2f}")
    ax.axhline(target - 0.5, color="gray", linestyle=":", label="earlier best - 0.5 pt")
    ax.set_xlabel("trials of the new sweep")
    ax.set_ylabel("best validation accuracy so far (%)")
    ax.set_title("Warm-started vs cold sweeps (one line per sampler seed)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output / "best_so_far.png", dpi=120)
    plt.close(fig)


def markdown(results: dict, command: str) -> str:
    earlier, m = results["earlier"], results["machine"]
    lines = [
        "# Warm-started sweeps vs cold sweeps", "",
        f"Command: `{command}`  ", f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}", "",
        f"Earlier sweep: {len(earlier['values'])} trials, best validation accuracy **{earlier['best']:.4f}** "
        f"({earlier['seconds']:.0f} s).", "",
        "Trials each new sweep needed to reach the earlier best (and the earlier best - 0.5 pt); "
        "'-' = not within its trials:", "",
        "| sampler seed | cold: reach best | warm: reach best | cold: reach best-0.5 | warm: reach best-0.5 "
        "| cold best | warm best | cold s | warm s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for seed in results["seeds"]:
        cold, warm = results["sweeps"]["cold"][str(seed)], results["sweeps"]["warm"][str(seed)]
        cells = [str(seed)] + [str(x) if x is not None else "-" for x in (
            cold["reach_best"], warm["reach_best"], cold["reach_close"], warm["reach_close"])]
        cells += [f"{cold['best']:.4f}", f"{warm['best']:.4f}", f"{cold['seconds']:.0f}", f"{warm['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    curves = {kind: [best_so_far(results["sweeps"][kind][str(seed)]["values"]) for seed in results["seeds"]]
              for kind in ("cold", "warm")}
    trials = min(len(c) for kind in curves for c in curves[kind])
    lines += ["", "Mean best-so-far validation accuracy over the sampler seeds, after each trial of the new sweeps:", "",
              "| after trial | " + " | ".join(str(i + 1) for i in range(trials)) + " |",
              "|---|" + "---|" * trials]
    for kind in ("cold", "warm"):
        means = [sum(c[i] for c in curves[kind]) / len(curves[kind]) for i in range(trials)]
        lines.append(f"| {kind} | " + " | ".join(f"{m:.4f}" for m in means) + " |")
    s = results["summary"]
    lines += ["", f"Mean trials to reach the earlier best - 0.5 pt (a sweep that never reaches it counts as "
                  f"trials + 1): cold {s['cold_mean_reach_close']:.2f}, warm {s['warm_mean_reach_close']:.2f}; "
                  f"earlier best itself: cold {s['cold_mean_reach_best']:.2f}, warm {s['warm_mean_reach_best']:.2f}.",
              "", "![best so far](best_so_far.png)", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder for results.json/.md and the plot")
    parser.add_argument("--work", default="sweeps/bench_warm_start", help="folder for the sweeps themselves")
    parser.add_argument("--earlier-trials", type=int, default=10)
    parser.add_argument("--trials", type=int, default=6, help="trials of each new sweep")
    parser.add_argument("--seeds", default="1,2,3", help="sampler seeds of the new sweeps")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every sweep")
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md and the plot from "
                                                                     "OUTPUT/results.json, training nothing")
    args = parser.parse_args()
    output, work = Path(args.output), Path(args.work)
    if args.report_only:
        results = json.loads((output / "results.json").read_text())
        plot(results, output)
        (output / "results.md").write_text(markdown(results, results["command"]))
        return 0
    output.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    common = list(args.overrides) + ["sweep.pruner.kind=none", "sweep.measure_cost=false"]

    earlier = run(work / "earlier", [*common, "sweep.seed=0", "train.seed=42", f"sweep.n_trials={args.earlier_trials}"])
    target = earlier["best"]
    sweeps: dict[str, dict] = {"cold": {}, "warm": {}}
    for seed in seeds:
        new = [*common, f"sweep.seed={seed}", "train.seed=43", f"sweep.n_trials={args.trials}"]
        for kind, extra in (("cold", []), ("warm", [f"sweep.warm_start={work / 'earlier'}"])):
            result = run(work / f"{kind}-seed{seed}", [*new, *extra])
            result["reach_best"] = trials_to_reach(result["values"], target)
            result["reach_close"] = trials_to_reach(result["values"], target - 0.005)
            sweeps[kind][str(seed)] = result
            print(f"{kind} seed {seed}: best {result['best']:.4f}, reaches earlier best at trial "
                  f"{result['reach_best']}, best-0.5pt at {result['reach_close']} ({result['seconds']:.0f} s)",
                  flush=True)

    def mean_reach(kind: str, key: str) -> float:
        return sum(r[key] or args.trials + 1 for r in sweeps[kind].values()) / len(seeds)

    results = {"machine": machine(), "seeds": seeds, "earlier": earlier, "sweeps": sweeps,
               "summary": {f"{kind}_mean_{key}": mean_reach(kind, key) for kind in ("cold", "warm")
                           for key in ("reach_best", "reach_close")}}
    command = shlex.join(["python", "scripts/bench_warm_start.py", *sys.argv[1:]])
    results["command"] = command
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, output)
    (output / "results.md").write_text(markdown(results, command))
    print(markdown(results, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
