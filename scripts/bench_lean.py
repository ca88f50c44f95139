"""From a fine-tuned model to a served one, measured: accuracy, size and CPU latency of each model in each runtime.

    python scripts/bench_lean.py --model teacher-L6=sweeps/lean/teacher --model student-L3=sweeps/lean/student-L3 \
        --baseline teacher-L6 --out-dir benchmarks/lean --exports-dir sweeps/lean/exports

Every model (a finished run folder) is exported with ``finetune.export.export_run`` to ONNX (float32 and
onnxruntime dynamic int8) and to PyTorch dynamic int8 (safetensors-int8), then each runtime is measured in
this one process, one after the other, with the same threads (``--threads``, default every core of this
process's affinity) for PyTorch and onnxruntime. An ensemble folder (a teacher) is measured in PyTorch fp32
only, its members one after another on inputs tokenised once:

- test accuracy on the recipe's test split (SST-2: the 872 GLUE dev sentences), from the runtime's own logits;
- parameters, and the size of the file a service loads;
- latency at batch 1 (median of one forward per test sentence, over --latency-rows sentences) and at batch 32
  (median over consecutive batches of 32 test sentences in test order, --batches of them), tokenisation excluded,
  after one untimed pass over the same inputs (first calls on a new shape pick and allocate kernels);
- throughput: all test sentences in batches of 32 sorted by length, tokenisation included.

``--baseline`` names the row every speed-up is relative to (its PyTorch float32 runtime). Results go to
<out-dir>/results.{json,md} and a Pareto plot of accuracy against batch-1 latency, <out-dir>/pareto.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

RUNTIMES = [  # name, export format, quantization (None: the run's own PyTorch model)
    ("pytorch fp32", None, None),
    ("pytorch int8", "safetensors-int8", None),
    ("onnxruntime fp32", "onnx", None),
    ("onnxruntime int8", "onnx", "dynamic-int8"),
]


def test_rows(run_dir: Path, labels: list[str]):
    """The run's test split (texts, pairs, gold label ids in ``labels`` order), as ``finetune analyze`` reads it."""
    from finetune.analysis.collect import _read_split
    from finetune.predict import check_run_folder

    return _read_split(check_run_folder(run_dir), labels, "test", run_dir)


def time_it(fn, repeats: int = 1) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def measure(name: str, forward, encode, texts: list[str], gold: list[str], labels: list[str], args) -> dict:
    """Accuracy, latency at batch 1 and 32, throughput: ``forward(enc) -> logits``, ``encode(texts) -> enc``."""
    import numpy as np

    predicted = []
    for start in range(0, len(texts), 64):
        predicted += np.asarray(forward(encode(texts[start:start + 64]))).argmax(-1).tolist()
    accuracy = float(np.mean([labels[p] == g for p, g in zip(predicted, gold)]))
    singles = [encode([t]) for t in texts[:args.latency_rows]]
    batches = [encode(texts[i:i + 32]) for i in range(0, len(texts) - 31, 32)][:args.batches]
    # one untimed pass over exactly the inputs timed next: a runtime's first call on a new shape picks and
    # allocates its kernels, which a service pays once, not per request
    for enc in singles + batches:
        forward(enc)
    batch1 = [time_it(lambda enc=enc: forward(enc)) for enc in singles]
    batch32 = [time_it(lambda enc=enc: forward(enc)) for enc in batches]
    by_length = sorted(texts, key=len)
    started = time.perf_counter()
    for start in range(0, len(by_length), 32):
        forward(encode(by_length[start:start + 32]))
    throughput = len(texts) / (time.perf_counter() - started)
    result = {"accuracy": round(100 * accuracy, 2), "ms_batch1": round(1000 * statistics.median(batch1), 2),
              "ms_batch32": round(1000 * statistics.median(batch32), 1),
              "sentences_per_second": round(throughput, 1)}
    print(f"  {name:<18} accuracy {result['accuracy']:.2f}  batch 1 {result['ms_batch1']:.2f} ms  batch 32 "
          f"{result['ms_batch32']:.1f} ms  {result['sentences_per_second']:.0f} sentences/s", flush=True)
    return result


def ensemble_runtime(label: str, folder: Path, args) -> list[dict]:
    """An ensemble teacher in PyTorch fp32 (ensembles are not exported: their members are): its members' weighted
    mean probabilities on inputs tokenised once, so the latency is what serving the members one after another costs."""
    import torch

    from finetune.ensemble import Ensemble
    from finetune.policies import plain

    ensemble = Ensemble.load(folder)
    if ensemble.method == "vote":
        raise SystemExit(f"{folder}: this script measures mean or weighted ensembles, not votes")
    first = ensemble.members[0].run
    for member in ensemble.members:
        if member.run.labels != ensemble.labels or member.run.tokenizer.get_vocab() != first.tokenizer.get_vocab():
            raise SystemExit(f"{folder}: this script measures ensembles whose members share one tokenizer and label "
                             f"order ({member.name} does not)")
    models = [plain(m.run.model)[0].eval() for m in ensemble.members]
    weights = torch.tensor(ensemble.weights, dtype=torch.float32)
    labels = ensemble.labels
    rows = test_rows(ensemble.members[0].path, labels)

    def encode(batch):
        return first.tokenizer(batch, truncation=True, max_length=first.recipe.data.max_length, padding=True,
                               return_tensors="pt")

    @torch.inference_mode()
    def forward(enc):
        probabilities = torch.stack([model(**enc).logits.float().softmax(-1) for model in models])
        return torch.einsum("m,mbc->bc", weights, probabilities).numpy()

    measured = measure("pytorch fp32", forward, encode, rows.texts, [labels[g] for g in rows.gold], labels, args)
    size = sum(f.stat().st_size for m in ensemble.members for f in m.path.glob("*.safetensors"))
    return [{"model": label, "runtime": "pytorch fp32", "run": str(folder),
             "parameters": sum(p.numel() for model in models for p in model.parameters()),
             "size_mb": round(size / 2**20, 1), **measured}]


def _exported_from(folder: Path, run_dir: Path) -> bool:
    """``folder`` holds an export of ``run_dir``'s current weights (a retrained run under the same name is not)."""
    from finetune.export.build import weights_fingerprint

    if not (folder / "export.json").is_file():
        return False
    source = json.loads((folder / "export.json").read_text()).get("source", {})
    return source.get("weights_blake2b") == weights_fingerprint(run_dir)


def runtimes_of(label: str, run_dir: Path, args) -> list[dict]:
    import torch

    from finetune.ensemble import is_ensemble
    from finetune.export import export_run, load_exported
    from finetune.policies import plain
    from finetune.predict import load_run

    if is_ensemble(run_dir):
        return ensemble_runtime(label, run_dir, args)
    run = load_run(run_dir)
    model = plain(run.model)[0].eval()
    params = sum(p.numel() for p in model.parameters())
    labels = run.labels
    rows = test_rows(run_dir, labels)
    texts, gold = rows.texts, [labels[g] for g in rows.gold]
    if rows.pairs:
        raise SystemExit(f"{run_dir}: text pairs are not measured by this script")
    results = []
    for runtime, fmt, quantize in RUNTIMES:
        if fmt is None:
            def encode(batch, tokenizer=run.tokenizer, length=run.recipe.data.max_length):
                return tokenizer(batch, truncation=True, max_length=length, padding=True, return_tensors="pt")

            @torch.inference_mode()
            def forward(enc):
                return model(**enc).logits.float().numpy()

            size = sum(f.stat().st_size for f in run_dir.glob("*.safetensors"))
            extra = {}
        else:
            folder = args.exports_dir / f"{label}-{fmt}{'-int8' if quantize else ''}"
            if not _exported_from(folder, run_dir):  # none yet, or made from other weights: export again
                report = export_run(run_dir, folder, format=fmt, quantize=quantize, overwrite=True)
                print("\n".join(f"  {line}" for line in report.summary), flush=True)
            served = load_exported(folder, threads=args.threads)
            encode, forward = (lambda batch, s=served: s.encode(batch)), served.logits
            meta = json.loads((folder / "export.json").read_text())
            size = (folder / meta["model_file"]).stat().st_size
            extra = {"export_check": meta.get("check")}
        measured = measure(runtime, forward, encode, texts, gold, labels, args)
        results.append({"model": label, "runtime": runtime, "run": str(run_dir), "parameters": params,
                        "size_mb": round(size / 2**20, 1), **measured, **extra})
    return results


def write_report(rows: list[dict], args, machine: dict, out: Path) -> None:
    base = next(r for r in rows if r["model"] == args.baseline and r["runtime"] == "pytorch fp32")
    for r in rows:
        r["accuracy_change"] = round(r["accuracy"] - base["accuracy"], 2)
        r["speedup_batch1"] = round(base["ms_batch1"] / r["ms_batch1"], 2)
        r["speedup_batch32"] = round(base["ms_batch32"] / r["ms_batch32"], 2)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix().replace(str(REPO) + "/", ""), *sys.argv[1:]])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2))
    lines = ["# From a fine-tuned model to a served one: SST-2, CPU\n",
             f"Command: `{command}`  ",
             f"Machine: {machine['cores']} CPU cores ({machine['cpu']}), {machine['threads']} threads for PyTorch "
             f"and onnxruntime, torch {machine['torch']}, onnxruntime {machine['onnxruntime']}, Python "
             f"{machine['python']}, {machine['date']}  ",
             f"Baseline: `{args.baseline}` in PyTorch fp32. Latency: median forward time, tokenisation excluded "
             f"(batch 1: one test sentence at a time; batch 32: consecutive test sentences); throughput: all test "
             f"sentences in length-sorted batches of 32, tokenisation included.\n",
             "| model | runtime | parameters | size MB | test acc | change | ms batch 1 | speed-up | ms batch 32 | "
             "speed-up | sentences/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['runtime']} | {r['parameters']:,} | {r['size_mb']} | {r['accuracy']:.2f} | "
                     f"{r['accuracy_change']:+.2f} | {r['ms_batch1']:.2f} | {r['speedup_batch1']:.2f}x | "
                     f"{r['ms_batch32']:.1f} | {r['speedup_batch32']:.2f}x | {r['sentences_per_second']:.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    pareto_plot(rows, out / "pareto.png")
    print("\n".join(lines))


def pareto_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"pytorch fp32": "o", "pytorch int8": "s", "onnxruntime fp32": "^", "onnxruntime int8": "D"}
    models = sorted({r["model"] for r in rows}, key=[r["model"] for r in rows].index)
    colors = dict(zip(models, plt.cm.tab10.colors))
    for r in rows:
        ax.scatter(r["ms_batch1"], r["accuracy"], marker=markers[r["runtime"]], color=colors[r["model"]], s=60)
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: r["ms_batch1"]):
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    ax.plot([r["ms_batch1"] for r in front], [r["accuracy"] for r in front], "k--", lw=1, label="Pareto front")
    for model in models:
        ax.scatter([], [], color=colors[model], label=model)
    for runtime, marker in markers.items():
        ax.scatter([], [], color="grey", marker=marker, label=runtime)
    ax.set_xscale("log")
    ax.set_xlabel("latency at batch 1, ms (log scale; lower is better)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title("Accuracy against CPU latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=RUN_DIR",
                        help="a finished run to measure (repeat; the table keeps this order), or an ensemble "
                             "folder (measured in PyTorch fp32 only)")
    parser.add_argument("--baseline", help="the NAME speed-ups are relative to (default: the first --model)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "lean")
    parser.add_argument("--exports-dir", type=Path, default=REPO / "sweeps" / "lean" / "exports")
    parser.add_argument("--threads", type=int, help="threads for PyTorch and onnxruntime (default: every core)")
    parser.add_argument("--latency-rows", type=int, default=300, help="sentences timed one by one (batch 1)")
    parser.add_argument("--batches", type=int, default=27, help="batches of 32 timed")
    args = parser.parse_args()

    import onnxruntime
    import torch
    from bench_prune import machine as machine_facts

    args.threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                    else os.cpu_count() or 1)
    torch.set_num_threads(args.threads)
    models = [m.split("=", 1) for m in args.model]
    args.baseline = args.baseline or models[0][0]
    machine = {**machine_facts(), "onnxruntime": onnxruntime.__version__}
    rows = []
    for label, run_dir in models:
        print(f"{label}: {run_dir}", flush=True)
        rows += runtimes_of(label, Path(run_dir), args)
    write_report(rows, args, machine, args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
