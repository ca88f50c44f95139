"""Benchmark pruning on SST-2 with all-MiniLM-L6-v2: accuracy, size and CPU latency before and after.

    python scripts/bench_prune.py                                   # ~30 min on 2 quiet CPU cores
    python scripts/bench_prune.py --model runs/bench-prune/base     # reuse a trained run, prune only
    python scripts/bench_prune.py --rows 64 --eval-rows 64 --test-rows 64 --out-dir /tmp/bench-smoke \
        --runs-dir /tmp/bench-smoke/runs --variants magnitude-0.5,layers-3-first        # smoke test, ~2 min

Step 1 trains (or reuses, with --model) a full fine-tune of all-MiniLM-L6-v2 on --rows SST-2 training
sentences (1 epoch, batch 32, the sst2_minilm_full recipe otherwise). Step 2 prunes it each way
below, each followed by a recovery fine-tune of --finetune-epochs over the same rows:

    magnitude-0.5          50 % of the backbone's linear weights zeroed (global L1)
    layers-3-first         3 of 6 encoder layers kept: the first three
    layers-3-importance    3 of 6 kept: greedily drop the layer whose removal hurts validation loss least
    heads-0.25, heads-0.5  a quarter / half of the 72 attention heads removed (gradient importance)

Validation uses --eval-rows sentences of SST-2's validation split (default 2,000), test the 872-sentence
GLUE dev set. Each variant's report is kept in <out-dir>/<variant>.json as soon as it is measured;
<out-dir>/results.{json,md} summarise them with the machine and the exact command.
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

VARIANTS = {
    "magnitude-0.5": {"method": "magnitude", "sparsity": 0.5},
    "layers-3-first": {"method": "layers", "layers_kept": 3, "layer_selection": "first"},
    "layers-3-importance": {"method": "layers", "layers_kept": 3, "layer_selection": "importance"},
    "heads-0.25": {"method": "heads", "heads_fraction": 0.25},
    "heads-0.5": {"method": "heads", "heads_fraction": 0.5},
}


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "gpu": torch.cuda.is_available(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def train_base(args: argparse.Namespace, data: list[str]) -> Path:
    import recipes

    recipe = recipes.sst2_minilm_full(f"data.max_train_samples={args.rows}", "train.epochs=1", "train.batch_size=32",
                                      "train.eval_every=epoch", *data, f"output.dir={Path(args.runs_dir) / 'base'}")
    started = time.perf_counter()
    result = recipe.run(overwrite=True)
    print(f"== trained the base model in {time.perf_counter() - started:.0f} s: {result.run_dir}", flush=True)
    return result.run_dir


def markdown(results: list[dict], info: dict, command: str, base: Path) -> str:
    first = results[0]["report"]["before"]
    lines = [
        "# Pruning all-MiniLM-L6-v2 on SST-2", "",
        f"Command: `{command}`  ",
        (f"Machine: {info['cores']} CPU cores ({info['cpu']}), torch {info['torch']} ({info['threads']} threads), "
         f"Python {info['python']}, {info['date']}  "),
        (f"Base model: `{base}`. Latency: median forward time on CPU over validation sentences (tokenisation "
         "excluded). Magnitude pruning keeps dense tensors: same file size, the zeros show only compressed."), "",
        ("| model | recovery | parameters | non-zero | size MB | zlib MB | ms batch 1 | ms batch 32 | "
         "validation acc | test acc | test change |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
        (f"| unpruned | - | {first['parameters']:,} | {first['nonzero_parameters']:,} | {first['size_mb']:.1f} | "
         f"{first['compressed_mb']:.1f} | {first['latency_ms_batch1']:.1f} | {first['latency_ms_batch32']:.1f} | "
         f"{100 * first['validation']['accuracy']:.2f} | {100 * first['test']['accuracy']:.2f} | |"),
    ]
    for result in results:
        report = result["report"]
        after, before, recovery = report["after"], report["before"], report["recovery"]
        change = 100 * (after["test"]["accuracy"] - before["test"]["accuracy"])
        recovered = f"{recovery['epochs']:g} ep, {recovery['seconds']:.0f} s" if recovery else "none"
        lines.append(
            f"| {result['variant']} | {recovered} | "
            f"{after['parameters']:,} | {after['nonzero_parameters']:,} | {after['size_mb']:.1f} | "
            f"{after['compressed_mb']:.1f} | {after['latency_ms_batch1']:.1f} | {after['latency_ms_batch32']:.1f} | "
            f"{100 * after['validation']['accuracy']:.2f} | {100 * after['test']['accuracy']:.2f} | {change:+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained run folder to prune (default: train one)")
    parser.add_argument("--rows", type=int, default=8000, help="SST-2 training sentences (training and recovery)")
    parser.add_argument("--eval-rows", type=int, default=2000, help="validation sentences")
    parser.add_argument("--test-rows", type=int, help="test sentences (default: all 872)")
    parser.add_argument("--finetune-epochs", type=float, default=1.0, help="recovery fine-tune after pruning")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "prune"))
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "bench-prune"))
    args = parser.parse_args()

    from finetune.config import PruneConfig
    from finetune.prune import prune_run

    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    command = "python scripts/bench_prune.py " + " ".join(sys.argv[1:])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = [f"data.max_eval_samples={args.eval_rows}"] + ([f"data.max_test_samples={args.test_rows}"] if args.test_rows else [])
    base = Path(args.model) if args.model else train_base(args, data)
    # the pruned runs read the same data: the recovery fine-tune trains on the base model's rows
    overrides = [f"data.max_train_samples={args.rows}", *data]
    info = machine()
    results = []
    for variant in args.variants.split(","):
        print(f"== {variant}", flush=True)
        cfg = PruneConfig(**VARIANTS[variant], finetune_epochs=args.finetune_epochs)
        report = prune_run(base, cfg, Path(args.runs_dir) / variant, overrides, overwrite=True)
        result = {"variant": variant, "report": report, "command": command, "machine": info}
        (out_dir / f"{variant}.json").write_text(json.dumps(result, indent=2))
        results.append(result)
        after = report["after"]
        print(f"   test accuracy {after['test']['accuracy']:.4f} (before {report['before']['test']['accuracy']:.4f}), "
              f"latency batch 32 {after['latency_ms_batch32']:.1f} ms", flush=True)
    table = markdown(results, info, command, base)
    (out_dir / "results.json").write_text(json.dumps({"command": command, "machine": info, "base": str(base),
                                                      "results": results}, indent=2))
    (out_dir / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
