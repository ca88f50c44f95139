"""Calibration of a single-label classifier: the expected calibration error (ECE) over equal-width
confidence bins, the reliability diagram, and temperature scaling (Guo et al. 2017, "On calibration of
modern neural networks"): one temperature T, fitted on the validation split by minimising the negative
log-likelihood of softmax(z / T). Dividing the logits by T leaves every argmax, so accuracy is unchanged.

Logits are recovered from probabilities as log p (softmax(log p) = p), so fitting needs only the outputs.
``finetune analyze RUN --fit-temperature`` stores T in ``RUN/calibration.json``; ``finetune predict`` then
divides the logits by it (single-label classification runs only, not ensembles).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from finetune import runs
from finetune.analysis.plotting import new_figure, save
from finetune.durable import atomic_write_text

BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)  # a search bound: T at either end means the fit wanted to go further
SMALLEST = 1e-300  # log(0) would be -inf; float64 softmax outputs stay above this unless truly 0


def confidence_and_correct(probabilities: np.ndarray, gold: np.ndarray,
                           predicted: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's probability of its predicted class (the argmax unless given) and whether it is right."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = probabilities.argmax(1) if predicted is None else np.asarray(predicted)
    confidence = probabilities[np.arange(len(predicted)), predicted]
    return confidence, predicted == np.asarray(gold)


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Bin b holds confidences in (b/bins, (b+1)/bins]; 0 goes to the first bin."""
    return np.clip(np.ceil(np.asarray(confidence) * bins).astype(int) - 1, 0, bins - 1)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per bin: its bounds, row count, accuracy and mean confidence (None for an empty bin)."""
    index, correct = _bin_index(confidence, bins), np.asarray(correct, dtype=np.float64)
    result = []
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        result.append({"lower": round(b / bins, 6), "upper": round((b + 1) / bins, 6), "count": count,
                       "accuracy": float(correct[inside].mean()) if count else None,
                       "confidence": float(np.asarray(confidence)[inside].mean()) if count else None})
    return result


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> float:
    """sum over bins of (rows in bin / rows) * |accuracy - mean confidence|."""
    total = len(confidence)
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
                     for b in reliability_bins(confidence, correct, bins) if b["count"])) if total else math.nan


def negative_log_likelihood(probabilities: np.ndarray, gold: np.ndarray) -> float:
    """Mean -log p(gold) (the cross-entropy loss), probabilities floored at 1e-300."""
    gold = np.asarray(gold)
    picked = np.asarray(probabilities, dtype=np.float64)[np.arange(len(gold)), gold]
    return float(-np.log(np.maximum(picked, SMALLEST)).mean())


def scale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(z / T) from softmax(z); ``scale(scale(p, T), 1 / T)`` gives p back."""
    logits = np.log(np.maximum(np.asarray(probabilities, dtype=np.float64), SMALLEST)) / temperature
    logits -= logits.max(1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(1, keepdims=True)


def fit_temperature(probabilities: np.ndarray, gold: np.ndarray) -> float:
    """The temperature in TEMPERATURE_RANGE that minimises the NLL of ``scale(probabilities, T)``
    (a bounded scalar search on log T; the NLL is smooth in it)."""
    from scipy.optimize import minimize_scalar

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    found = minimize_scalar(lambda log_t: negative_log_likelihood(scale(probabilities, math.exp(log_t)), gold),
                            bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(found.x))


def summary(probabilities: np.ndarray, gold: np.ndarray, predicted: np.ndarray | None = None) -> dict:
    """ECE, NLL and reliability bins of one set of outputs."""
    confidence, correct = confidence_and_correct(probabilities, gold, predicted)
    return {"ece": expected_calibration_error(confidence, correct), "nll": negative_log_likelihood(probabilities, gold),
            "mean_confidence": float(confidence.mean()), "accuracy": float(correct.mean()),
            "bins": reliability_bins(confidence, correct)}


def save_temperature(run_dir: Path, record: dict) -> Path:
    """Write ``RUN/calibration.json`` atomically: the temperature, where it was fitted, and the before/after
    numbers in ``record`` (a time stamp is added)."""
    stamped = {**record, "fitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(Path(run_dir) / runs.CALIBRATION, json.dumps(stamped, indent=2) + "\n")
    return Path(run_dir) / runs.CALIBRATION


def plot_reliability(curves: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Accuracy against confidence per bin (the first curve as bars, any other as a line), the diagonal of
    perfect calibration, and below it how many rows fall in each bin."""
    figure = new_figure(6, 6.6, layout=None)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect")
    for n, (name, bins) in enumerate(curves.items()):
        filled = [b for b in bins if b["count"]]
        centres = [(b["lower"] + b["upper"]) / 2 for b in filled]
        if n == 0:
            width = (filled[0]["upper"] - filled[0]["lower"] if filled else 1 / BINS) * 0.9
            accuracy = [b["accuracy"] for b in filled]
            gap = [b["confidence"] - b["accuracy"] for b in filled]
            top.bar(centres, accuracy, width=width, color="tab:blue", alpha=0.8, edgecolor="white",
                    label=f"accuracy ({name})")
            top.bar(centres, gap, bottom=accuracy, width=width, color="tab:red", alpha=0.25, hatch="//",
                    edgecolor="tab:red", linewidth=0, label="gap to mean confidence")
            bottom.bar(centres, [b["count"] for b in filled], width=width, color="tab:blue", alpha=0.8)
        else:
            top.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], marker="o", markersize=4,
                     color="tab:orange", label=f"{name} (at mean confidence)")
    top.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy in the bin")
    top.set_title(title, pad=40)
    top.grid(alpha=0.3)
    top.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, frameon=False, fontsize=8)
    bottom.set(xlabel="confidence (probability of the predicted class)", ylabel="rows")
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    return save(figure, path, tight=True)
