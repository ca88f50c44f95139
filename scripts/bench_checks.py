"""What the safety checks cost: the same training command before and after them, side by side.

    python scripts/bench_checks.py                       # base f155117 vs this tree, 3 rounds
    python scripts/bench_checks.py --base REV --rounds 5 --rows 2000

The base revision is extracted with `git archive` into a temporary folder; each round runs the
README's quick command (SST-2, `--rows` training rows, one epoch, the full recipe) once from the
base tree and once from this one, alternating, each in its own process. Before the checks the recipe
read `${FINETUNE_DATA_DIR}/sst2`'s split files; now it names `stanfordnlp/sst2`, read from the same
copy (train + validation files, with a seeded 10 % validation carve-out), so the data sizes match.
Reported per side: median wall time of the process, and from metrics.json the setup seconds
(data, model, folder) and training seconds. Results: benchmarks/checks.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_side(tree: Path, rows: int, run_dir: Path) -> dict:
    """One training process from ``tree``; its wall time and the run's own time split."""
    command = [sys.executable, "scripts/finetune.py", "--recipe", "recipes/sst2_minilm_full.yaml",
               f"data.max_train_samples={rows}", "train.epochs=1", f"output.dir={run_dir}", "--overwrite"]
    # the base tree is extracted elsewhere, so its default data folder (../shared/data) must be named
    data_dir = os.environ.get("FINETUNE_DATA_DIR", str(REPO.parent / "shared" / "data"))
    env = {**os.environ, "PYTHONPATH": str(tree), "FINETUNE_DATA_DIR": data_dir, "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    seconds = metrics.get("seconds", {})
    return {"wall": wall, "setup": seconds.get("setup"), "train": metrics["train_seconds"],
            "test_accuracy": metrics.get("test", {}).get("accuracy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="f155117", help="revision before the checks")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "archive", args.base], cwd=REPO, capture_output=True, check=True).stdout
        archive_path = Path(tmp) / "base.tar"
        archive_path.write_bytes(archive)
        with tarfile.open(archive_path) as tar:
            tar.extractall(base, filter="data")
        sides = {"before": base, "after": REPO}
        results: dict[str, list[dict]] = {name: [] for name in sides}
        for round_ in range(args.rounds):
            for name, tree in sides.items():
                result = run_side(tree, args.rows, Path(tmp) / f"run-{name}")
                results[name].append(result)
                print(f"round {round_ + 1} {name:6s} wall {result['wall']:6.1f} s  setup {result['setup']:5.1f} s  "
                      f"train {result['train']:6.1f} s  test accuracy {result['test_accuracy']:.4f}", flush=True)

    summary = {name: {key: statistics.median(r[key] for r in runs) for key in ("wall", "setup", "train")}
               for name, runs in results.items()}
    ratio = {key: summary["after"][key] / summary["before"][key] for key in ("wall", "setup", "train")}
    command = "python scripts/bench_checks.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items())
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
    out = {"command": command, "machine": machine, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "base": args.base, "rows": args.rows, "runs": results, "median": summary, "after_over_before": ratio}
    bench = REPO / "benchmarks"
    (bench / "checks.json").write_text(json.dumps(out, indent=2))
    lines = [f"# Cost of the safety checks (SST-2, {args.rows} training rows, 1 epoch, full fine-tune)", "",
             f"`{command}` on {machine}, {out['date']}; medians of {args.rounds} alternating rounds, each side in its "
             "own process. The base reads SST-2's split files; this tree names `stanfordnlp/sst2` and carves "
             "validation out of train + validation, so both train on 2,000 rows and validate on 6,735, "
             "but not the same rows: compare times, not accuracy.", "",
             "| | wall (s) | setup (s) | train (s) |", "|---|---|---|---|"]
    for name in sides:
        lines.append(f"| {name} ({args.base if name == 'before' else 'this tree'}) | {summary[name]['wall']:.1f} | "
                     f"{summary[name]['setup']:.1f} | {summary[name]['train']:.1f} |")
    lines.append(f"| after / before | {ratio['wall']:.3f} | {ratio['setup']:.3f} | {ratio['train']:.3f} |")
    (bench / "checks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
