"""Does validation rank models as the test set does? SST-2's row carve-out against the whole-text one.

    python scripts/bench_validation.py                    # -> benchmarks/validation/
    python scripts/bench_validation.py --trials 10 --rows 4000

SST-2's training split holds every phrase of its sentences; the test split holds full sentences. A
validation split of random training rows (``data.splits.validation_by=row``, what the shipped recipe did)
is mostly short phrases whose sentences were trained on; ``validation_by=whole_text`` holds out whole
sentences and every phrase inside them. To compare the two on the same models, the training rows here are
what is left once *both* are held out (so neither was trained on):

1. the whole-text carve-out of the recipe's training split (10 % of its 7,073 whole texts, seed 0);
2. from the rest, 2,000 random rows (the row carve-out, seed 0);
3. from the rest, ``--rows`` random rows to train on.

``--trials`` configurations (learning rate, epochs, warm-up, policy: drawn with a fixed seed, as a random
search would) train on those rows; each final model is scored on both validation sets and on the 872 test
sentences. The Spearman correlation between each validation's scores and the test scores, over the
trials, says how well that validation would have chosen among them. The derived data files live under
--work-dir (runs/, not committed). Each trial is measured once: its json is kept and reused.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))  # first: scripts/finetune.py must not shadow the package
from bench_recipes import machine  # noqa: E402

SST2 = Path(__import__("os").environ.get("FINETUNE_DATA_DIR", REPO.parent / "shared" / "data")) / "sst2"


def build_data(folder: Path, rows: int) -> dict:
    """train.tsv, row.tsv (validation by rows), whole.tsv (validation by whole texts), test.tsv."""
    from finetune.config import DataConfig
    from finetune.data import load_splits
    from finetune.sources import carve_validation

    whole_cfg = DataConfig(path=str(SST2), columns={"text": "sentence"},
                           splits={"train": "train", "validation_from_train": 0.1, "validation_by": "whole_text",
                                   "test": "test"})
    raw = load_splits(whole_cfg)
    row_cfg = DataConfig(path=str(SST2), columns={"text": "sentence"},
                         splits={"train": "train", "validation_from_train": 2000, "test": "test"})
    rest, by_row = carve_validation(raw["train"], 2000, 0, row_cfg)
    train = rest.shuffle(seed=0).select(range(min(rows, len(rest))))
    return write_splits(folder, {"train": train, "row": by_row, "whole": raw["validation"], "test": raw["test"]})


def write_splits(folder: Path, splits: dict) -> dict[str, int]:
    """Each SST-2 split as <name>.tsv with the recipe's label names (the files say 0 and 1, the hub's
    ClassLabel means negative and positive); the rows each holds."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        with open(folder / f"{name}.tsv", "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(["sentence", "label"])
            writer.writerows((text, ("negative", "positive")[int(label)])
                             for text, label in zip(split["sentence"], split["label"]))
    return {name: len(split) for name, split in splits.items()}


def draw_configs(count: int, seed: int = 0) -> list[list[str]]:
    """A random search's trials: seeded draws over the knobs users search."""
    rng = random.Random(seed)
    configs = []
    for _ in range(count):
        kind = rng.choice(["full", "lora"])
        lr = 10 ** rng.uniform(-5, -3.7) if kind == "full" else 10 ** rng.uniform(-4.3, -2.5)
        configs.append([f"policy.kind={kind}", f"train.lr={lr:.3g}", f"train.epochs={rng.choice([1, 2])}",
                        f"train.warmup_ratio={rng.choice([0.0, 0.1])}"])
    return configs


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> np.ndarray:  # average ranks for ties
        order = np.argsort(values, kind="stable")
        ranked = np.empty(len(values))
        values_sorted = np.asarray(values)[order]
        i = 0
        while i < len(values):
            j = i
            while j + 1 < len(values) and values_sorted[j + 1] == values_sorted[i]:
                j += 1
            ranked[order[i:j + 1]] = (i + j) / 2
            i = j + 1
        return ranked

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def run_trial(index: int, overrides: list[str], data: Path, runs: Path) -> dict:
    import recipes
    from finetune.predict import evaluate_run

    run_dir = runs / f"trial-{index:02d}"
    recipe = recipes.load("sst2_minilm_full", f"data.path={data}", "data.splits.train=train",
                          "data.splits.validation_from_train=null", "data.splits.validation=row",
                          "data.splits.test=test", "train.eval_every=100000",  # the final model, no selection
                          "eval.analyze=false", f"output.dir={run_dir}", *overrides)
    result = recipe.run(overwrite=True)
    # every file in the folder must be read by some split: test.tsv stands in as validation here
    whole = evaluate_run(run_dir, "test", ["data.splits.validation=test", "data.splits.test=whole"])
    return {"trial": index, "overrides": overrides, "row": result.metrics["validation"]["accuracy"],
            "whole": whole["accuracy"], "test": result.metrics["test"]["accuracy"],
            "train_seconds": result.metrics["train_seconds"]}


def plot(trials: list[dict], path: Path, rho: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    test = [100 * t["test"] for t in trials]
    for key, label, marker in (("row", "random rows (phrases)", "o"), ("whole", "whole texts (sentences)", "s")):
        ax.scatter([100 * t[key] for t in trials], test, marker=marker,
                   label=f"validation by {label}: Spearman {rho[key]:+.2f}")
    ax.set_xlabel("validation accuracy (%)")
    ax.set_ylabel("test accuracy, 872 sentences (%)")
    ax.set_title("Each point a trained model: how validation orders them vs test")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--rows", type=int, default=4000, help="training rows")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "validation"))
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "validation-bench"))
    args = parser.parse_args()
    out, work = Path(args.out_dir), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/bench_validation.py " + " ".join(sys.argv[1:])
    info = {**machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    sizes = build_data(work / "data", args.rows)
    print(f"data: {sizes}", flush=True)
    trials = []
    for index, overrides in enumerate(draw_configs(args.trials)):
        saved = out / f"trial-{index:02d}.json"
        if saved.exists() and json.loads(saved.read_text())["overrides"] == overrides:
            trials.append(json.loads(saved.read_text()))
            continue
        print(f"== trial {index}: {' '.join(overrides)}", flush=True)
        trial = run_trial(index, overrides, work / "data", work / "runs")
        saved.write_text(json.dumps(trial, indent=2))
        trials.append(trial)
        print(f"   row {trial['row']:.4f}  whole {trial['whole']:.4f}  test {trial['test']:.4f}", flush=True)
    rho = {key: spearman([t[key] for t in trials], [t["test"] for t in trials]) for key in ("row", "whole")}
    plot(trials, out / "validation_vs_test.png", rho)

    def mean(key: str) -> float:
        return 100 * sum(t[key] for t in trials) / len(trials)

    def picked(key: str) -> dict:
        return max(trials, key=lambda t: t[key])

    lines = ["# Which validation predicts test? SST-2, random rows vs whole texts", "",
             f"Command: `{command}` ({info['date']})  ",
             f"Machine: {info['cores']} CPU cores ({info['cpu']}), Python {info['python']}, torch {info['torch']}, "
             "no GPU  ",
             f"Data: {sizes['train']:,} training rows; validation by rows {sizes['row']:,} rows, by whole texts "
             f"{sizes['whole']:,} sentences; test {sizes['test']} sentences (none of them trained on).", "",
             "| validation | rows | mean accuracy | Spearman vs test over the trials | its pick's test accuracy |",
             "|---|---|---|---|---|"]
    for key, label in (("row", "random training rows (`validation_by: row`)"),
                       ("whole", "whole texts (`validation_by: whole_text`)")):
        lines.append(f"| {label} | {sizes[key]:,} | {mean(key):.2f} % | {rho[key]:+.2f} | "
                     f"{100 * picked(key)['test']:.2f} % (trial {picked(key)['trial']}) |")
    best = max(t["test"] for t in trials)
    lines += [f"| test itself (for reference) | {sizes['test']} | {mean('test'):.2f} % | | {100 * best:.2f} % |", "",
              "![validation vs test](validation_vs_test.png)", "",
              "| trial | overrides | validation by rows | validation by whole texts | test |", "|---|---|---|---|---|"]
    lines += [f"| {t['trial']} | {' '.join(t['overrides'])} | {100 * t['row']:.2f} | {100 * t['whole']:.2f} | "
              f"{100 * t['test']:.2f} |" for t in trials]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
