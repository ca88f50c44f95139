"""Benchmark ensembles of a sweep's best trials against its best single trial, on validation and test.

    python scripts/bench_ensemble.py --from-sweep /tmp/ft/sst2-sweep --top-k 3 --output benchmarks/ensemble
    python scripts/bench_ensemble.py --from-sweep SWEEP_DIR --top-k 3 --output DIR data.max_test_samples=200

Prediction only: each of the top-k trials (ranked by the sweep's validation objective, models still
on disk) scores the validation and test rows once; mean, validation-weighted mean, majority vote
and greedy selection (mean and vote) are then combined in memory. The best single trial is the
one the sweep ranks first on validation (what you would ship without an ensemble). The
comparison with it on test is paired: McNemar's exact test on the sentences where the two
disagree in correctness. Writes OUTPUT/results.json and OUTPUT/results.md (machine and command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def machine() -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine()) \
        if Path("/proc/cpuinfo").is_file() else platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def mcnemar(pool, weights_a, method_a: str, weights_b, method_b: str, split: str = "test") -> dict:
    """Paired comparison of two classifiers on the same rows: counts of rows only A / only B gets right,
    and the exact two-sided McNemar p-value (binomial test on the discordant rows)."""
    import torch
    from scipy.stats import binomtest

    from finetune.ensemble import predict_ids

    gold = torch.tensor(pool.splits[split].gold)
    right_a = predict_ids(pool.outputs[split], weights_a, method_a) == gold
    right_b = predict_ids(pool.outputs[split], weights_b, method_b) == gold
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"only_ensemble_right": only_a, "only_single_right": only_b, "p_value": round(float(p), 4)}


def evaluate(sweep_dir: Path, top_k: int, overrides: list[str], batch_size: int) -> dict:
    import torch

    from finetune.ensemble import Pool, load_members, setup_logging, sweep_candidates

    setup_logging()
    rows = {r["number"]: r for r in json.loads((sweep_dir / "report" / "trials.json").read_text())}
    chosen = sweep_candidates(sweep_dir, top_k)
    members = load_members([p for p, _ in chosen], [n for _, n in chosen], "--from-sweep")
    recipe = members[0].run.recipe.with_overrides(overrides)
    started = time.perf_counter()
    pool = Pool(members, recipe, batch_size)
    predict_seconds = time.perf_counter() - started
    n, k = len(members), len(members)
    single = pool.one_hot(0)  # the sweep's best trial on validation
    configs = {"best single trial": (single, "mean", None),
               "mean": (torch.full((n,), 1.0 / n, dtype=torch.float64), "mean", None),
               "weighted": (pool.validation_weights(), "weighted", None),
               "vote": (torch.full((n,), 1.0 / n, dtype=torch.float64), "vote", None)}
    for method in ("mean", "vote"):
        weights, trace = pool.greedy(method, k)
        configs[f"greedy ({method})"] = (weights, method, trace)
    results = {}
    for name, (weights, method, trace) in configs.items():
        results[name] = {"combine": method, "weights": [round(float(w), 4) for w in weights],
                         **{split: pool.scores(weights, method, split) for split in pool.splits}}
        if trace is not None:
            results[name]["selection"] = [t["added"] for t in trace]
        if name != "best single trial" and "test" in pool.splits:
            results[name]["vs_best_single_on_test"] = mcnemar(pool, weights, method, single, "mean")
    members_out = []
    for member, val, test in zip(members, pool.member_scores("validation"), pool.member_scores("test")):
        row = rows[int(member.name.split()[-1])]
        members_out.append({"name": member.name, "overrides": row["overrides"], "sweep_validation": row["value"],
                            "sweep_test": (row.get("test") or {}), "validation": val, "test": test})
    total_rows = sum(len(s.gold) for s in pool.splits.values())
    return {"sweep_dir": str(sweep_dir), "top_k": top_k, "overrides": overrides, "primary": pool.primary,
            "rows": {split: len(s.gold) for split, s in pool.splits.items()}, "members": members_out,
            "results": results, "predict_seconds": round(predict_seconds, 1),
            "rows_per_second_per_member": round(total_rows * n / predict_seconds, 1)}


def markdown(report: dict) -> str:
    info, primary = report["machine"], report["primary"]
    metrics = list(report["results"]["best single trial"]["test"])
    lines = [f"# Ensembles of the top {report['top_k']} sweep trials vs the best single trial", "",
             f"Command: `{report['command']}` ({info['date']})  ",
             (f"Machine: {info['cores']} CPU cores ({info['cpu']}), no GPU, torch {info['torch']} "
             f"({info['threads']} threads), transformers {info['transformers']}, Python {info['python']}  "),
             f"Sweep: `{report['sweep_dir']}`; rows: " + ", ".join(f"{v} {k}" for k, v in report["rows"].items()),
             "", "## Members (ranked by the sweep's validation objective)", "",
             "| trial | settings | validation " + primary + " | test " + primary + " | test (sweep's own record) |",
             "|---|---|---|---|---|"]
    for m in report["members"]:
        own = m["sweep_test"].get(primary)
        lines.append(f"| {m['name']} | {m['overrides']} | {m['validation'][primary]:.4f} | {m['test'][primary]:.4f} | "
                     f"{'' if own is None else f'{own:.4f}'} |")
    lines += ["", "## Ensembles", "",
              "| | weights | " + " | ".join(f"validation {x}" for x in metrics) + " | "
              + " | ".join(f"test {x}" for x in metrics) + " | test vs best single (McNemar) |",
              "|---" * (3 + 2 * len(metrics)) + "|"]
    for name, r in report["results"].items():
        paired = r.get("vs_best_single_on_test")
        versus = (f"+{paired['only_ensemble_right']} / -{paired['only_single_right']}, p = {paired['p_value']:.3f}"
                  if paired else "")
        cells = " | ".join(f"{r['validation'].get(x, float('nan')):.4f}" for x in metrics) + " | " + \
            " | ".join(f"{r['test'].get(x, float('nan')):.4f}" for x in metrics)
        lines.append(f"| {name} | {', '.join(f'{w:.3f}' for w in r['weights'])} | {cells} | {versus} |")
    lines += ["", (f"Prediction: {report['predict_seconds']} s for every member on every split "
              f"({report['rows_per_second_per_member']} rows/s per member); combining is in memory."),
              f"Load average (1 min) before / after: {report['load_before']:.1f} / {report['load_after']:.1f} on "
              f"{info['cores']} cores" + (" — other processes shared the CPU, so timings are indicative only."
                                          if max(report['load_before'], report['load_after']) > info['cores'] * 0.75
                                          else "."),
              "", ("Validation chose the trials (the sweep) and the greedy bags, so validation scores of ensembles are "
              "optimistic; test is the honest comparison. `+a / -b`: test sentences only the ensemble / only the best "
              "single trial gets right; p is McNemar's exact two-sided test on those a + b sentences."),
              "`nan`: loss is not defined for a vote."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-sweep", required=True, help="finished sweep folder")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "ensemble"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="data.* overrides, e.g. data.max_test_samples=200")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    report = evaluate(Path(args.from_sweep), args.top_k, args.overrides, args.batch_size)
    report.update(machine=machine(), load_before=load_before, load_after=os.getloadavg()[0],
                  command="python scripts/bench_ensemble.py " + " ".join(sys.argv[1:] if argv is None else argv))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
