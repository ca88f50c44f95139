"""Multi-label classification: per-label scores at the model's thresholds, how F1 moves with each label's
threshold, how many labels rows get, and the rows with most wrong labels.

A label is predicted when its probability is above (strictly) its threshold, as in the run. Scores follow
sklearn (and the run's ``multilabel_*`` metrics): a label with no true and no predicted positive scores 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finetune.analysis import plotting
from finetune.analysis.outputs import Analysis, SplitOutputs
from finetune.analysis.text import clean, number, shorten, table

CURVE_THRESHOLDS = np.round(np.linspace(0.0, 1.0, 101), 2)
"""Thresholds at which each label's F1 curve is computed."""
MAX_CURVES = 12
"""Threshold curves drawn in one figure (the most frequent labels); all are in the summary."""


def label_scores(gold: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """Per label (columns of the (N, C) 0/1 arrays): precision, recall, F1, support, predicted count."""
    gold, predicted = gold.astype(bool), predicted.astype(bool)
    tp = (gold & predicted).sum(0)
    support, count = gold.sum(0), predicted.sum(0)
    return {"precision": np.divide(tp, count, out=np.zeros(tp.shape), where=count > 0),
            "recall": np.divide(tp, support, out=np.zeros(tp.shape), where=support > 0),
            "f1": np.divide(2 * tp, support + count, out=np.zeros(tp.shape), where=support + count > 0),
            "support": support, "predicted": count}


def threshold_curves(gold: np.ndarray, probabilities: np.ndarray,
                     thresholds: np.ndarray = CURVE_THRESHOLDS) -> np.ndarray:
    """F1 of every label at every threshold, (len(thresholds), C): label predicted where probability > t."""
    gold = gold.astype(bool)
    return np.stack([label_scores(gold, probabilities > t)["f1"] for t in thresholds])


def analyze(outputs: SplitOutputs, folder: Path, k: int = 10) -> Analysis:
    """Per-label and overall scores, cardinality, threshold curves and the k rows with most wrong labels.

    Writes ``multi_label_f1.png`` and, with probabilities, ``multi_label_threshold_curves.png`` into ``folder``.

    Raises:
        ValueError: the arrays' shapes disagree, or the outputs have no labels.
    """
    if not outputs.labels:
        raise ValueError("multi-label outputs need their label names (labels)")
    labels = list(outputs.labels)
    gold = np.asarray(outputs.gold).astype(bool).reshape(-1, len(labels))
    probabilities = None if outputs.probabilities is None else np.asarray(outputs.probabilities, dtype=float)
    thresholds = (np.full(len(labels), 0.5) if outputs.thresholds is None
                  else np.asarray(outputs.thresholds, dtype=float).reshape(-1))
    if outputs.predicted is not None:
        predicted = np.asarray(outputs.predicted).astype(bool).reshape(-1, len(labels))
    elif probabilities is not None:
        predicted = probabilities > thresholds
    else:
        raise ValueError("multi-label outputs need predictions or probabilities")
    if predicted.shape != gold.shape or len(thresholds) != len(labels) or (
            probabilities is not None and probabilities.shape != gold.shape):
        raise ValueError(f"shapes disagree: gold {gold.shape}, predicted {predicted.shape}, thresholds "
                         f"{thresholds.shape}, probabilities {None if probabilities is None else probabilities.shape}")

    scores = label_scores(gold, predicted)
    curves = threshold_curves(gold, probabilities) if probabilities is not None else None
    per_label = {}
    for c, label in enumerate(labels):
        entry = {key: scores[key][c] for key in ("precision", "recall", "f1", "support", "predicted")}
        entry["threshold"] = float(thresholds[c])
        if curves is not None:
            best = len(CURVE_THRESHOLDS) - 1 - int(np.argmax(curves[::-1, c]))  # the highest of equal bests
            entry.update(best_threshold=float(CURVE_THRESHOLDS[best]), best_f1=float(curves[best, c]))
        per_label[label] = entry
    tp, n_gold, n_predicted = int((gold & predicted).sum()), int(gold.sum()), int(predicted.sum())
    summary = {
        "task": outputs.task, "split": outputs.split, "model": outputs.model,
        "rows": len(gold), "label_count": len(labels),
        "micro_precision": tp / n_predicted if n_predicted else 0.0,
        "micro_recall": tp / n_gold if n_gold else 0.0,
        "micro_f1": 2 * tp / (n_gold + n_predicted) if n_gold + n_predicted else 0.0,
        "macro_f1": float(scores["f1"].mean()) if labels else 0.0,
        "exact_match": float((gold == predicted).all(1).mean()) if len(gold) else None,
        "hamming_loss": float((gold != predicted).mean()) if gold.size else None,
        "cardinality": _cardinality(gold, predicted),
        "per_label": per_label,
        "never_predicted": [label for label, e in per_label.items() if e["predicted"] == 0],
        "no_positives": [label for label, e in per_label.items() if e["support"] == 0],
        "threshold_curves": None if curves is None else {
            "thresholds": CURVE_THRESHOLDS, "f1": {label: np.round(curves[:, c], 4) for c, label in enumerate(labels)}},
        "worst_rows": _worst_rows(outputs, labels, gold, predicted, probabilities, k),
    }
    folder = Path(folder)
    figures = []
    if labels:
        figures.append(plotting.score_bars(labels, scores["f1"], scores["precision"], scores["recall"],
                                           scores["support"], plotting.title_of(outputs.model, outputs.split,
                                                                                "F1 per label"),
                                           folder / "multi_label_f1.png"))
    if curves is not None and labels:
        figures.append(_curves_figure(outputs, labels, curves, per_label, folder / "multi_label_threshold_curves.png"))
    return Analysis(summary=clean(summary), markdown=_markdown(summary, figures),
                    console=_console(summary), figures=figures)


def _cardinality(gold: np.ndarray, predicted: np.ndarray) -> dict:
    """Mean labels per row, gold and predicted, and how many rows have 0, 1, 2, ... labels."""
    gold_counts, predicted_counts = gold.sum(1), predicted.sum(1)
    top = int(max(gold_counts.max(initial=0), predicted_counts.max(initial=0)))
    return {"gold_mean": float(gold_counts.mean()) if len(gold) else None,
            "predicted_mean": float(predicted_counts.mean()) if len(gold) else None,
            "rows_by_count": {str(n): {"gold": int((gold_counts == n).sum()), "predicted": int((predicted_counts == n).sum())}
                              for n in range(top + 1)}}


def _worst_rows(outputs: SplitOutputs, labels: list[str], gold: np.ndarray, predicted: np.ndarray,
                probabilities: np.ndarray | None, k: int) -> list[dict]:
    """The k rows with most wrong labels (missed + extra), then the most confident mistakes first."""
    wrong = gold != predicted
    n_wrong = wrong.sum(1)
    if probabilities is not None:  # how far the wrong labels' probabilities are on the wrong side
        confidence = np.where(wrong, np.abs(probabilities - 0.5), 0.0).sum(1)
    else:
        confidence = np.zeros(len(gold))
    rows = [int(r) for r in np.lexsort((-confidence, -n_wrong)) if n_wrong[r] > 0][:k]

    def named(row: int, mask: np.ndarray) -> list[str]:
        if probabilities is None:
            return [labels[c] for c in np.flatnonzero(mask)]
        return [f"{labels[c]} ({probabilities[row, c]:.2f})" for c in np.flatnonzero(mask)]

    return [{"row": r, "wrong": int(n_wrong[r]), "text": shorten(outputs.texts[r], 300),
             **({"pair": shorten(outputs.pairs[r], 300)} if outputs.pairs else {}),
             "gold": [labels[c] for c in np.flatnonzero(gold[r])],
             "predicted": [labels[c] for c in np.flatnonzero(predicted[r])],
             "missed": named(r, gold[r] & ~predicted[r]), "extra": named(r, predicted[r] & ~gold[r])}
            for r in rows]


def _curves_figure(outputs: SplitOutputs, labels: list[str], curves: np.ndarray, per_label: dict,
                   path: Path) -> Path:
    drawn = sorted(range(len(labels)), key=lambda c: (-per_label[labels[c]]["support"], c))[:MAX_CURVES]
    fig = plotting.new_figure(9.5 if len(drawn) > 4 else 8.5, 5.5)
    ax = fig.add_subplot()
    colours = [f"C{i}" for i in range(10)] + ["#8c564b", "#17becf"]
    for i, c in enumerate(drawn):
        entry = per_label[labels[c]]
        ax.plot(CURVE_THRESHOLDS, curves[:, c], color=colours[i % len(colours)], linewidth=1.6,
                linestyle="-" if i < 10 else "--",
                label=f"{plotting.short(labels[c])} (n={entry['support']:,}, t={entry['threshold']:.2f})")
        ax.plot([entry["threshold"]], [entry["f1"]], marker="o", markersize=7, color=colours[i % len(colours)],
                markeredgecolor="black", linestyle="none")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("threshold (label predicted when probability > threshold)")
    ax.set_ylabel("F1")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="label (● current threshold)",
              title_fontsize=8)
    what = "F1 against threshold"
    if len(drawn) < len(labels):
        what += f" ({len(drawn)} most frequent of {len(labels)} labels)"
    ax.set_title(plotting.title_of(outputs.model, outputs.split, what), fontsize=10)
    return plotting.save(fig, path)


def _markdown(s: dict, figures: list[Path]) -> str:
    card = s["cardinality"]
    lines = [f"## Multi-label classification: {s['split']}", "",
             f"{s['rows']:,} rows, {s['label_count']:,} labels; a label is predicted above its threshold.", "",
             table(["metric", "value"], [
                 ["F1 (micro)", s["micro_f1"]], ["precision (micro)", s["micro_precision"]],
                 ["recall (micro)", s["micro_recall"]], ["F1 (macro)", s["macro_f1"]],
                 ["exact match", s["exact_match"]], ["Hamming loss", s["hamming_loss"]],
                 ["labels per row, gold", card["gold_mean"]], ["labels per row, predicted", card["predicted_mean"]]]),
             "", "### Per label", ""]
    curves = s["threshold_curves"] is not None
    headers = ["label", "precision", "recall", "F1", "support", "predicted", "threshold"]
    headers += ["best threshold here", "F1 there"] if curves else []
    rows = [[label, e["precision"], e["recall"], e["f1"], e["support"], e["predicted"], e["threshold"]]
            + ([e["best_threshold"], e["best_f1"]] if curves else [])
            for label, e in sorted(s["per_label"].items(), key=lambda item: (item[1]["f1"], -item[1]["support"]))]
    lines += [table(headers, rows), ""]
    if curves:
        lines += [("The best threshold is on this split's own gold labels (0.01 steps): optimistic, and an "
                  "honest choice only on a split the test scores are not read from."), ""]
    if s["never_predicted"]:
        lines += [f"Never predicted: {', '.join(s['never_predicted'])}.", ""]
    if s["no_positives"]:
        lines += [f"No gold positive in this split (F1 0 by convention): {', '.join(s['no_positives'])}.", ""]
    lines += [f"![{f.stem.replace('_', ' ')}]({f.name})" for f in figures] + [""]
    lines += ["### Labels per row", "",
              table(["labels", "rows (gold)", "rows (predicted)"],
                             [[n, v["gold"], v["predicted"]] for n, v in card["rows_by_count"].items()]), ""]
    if s["worst_rows"]:
        pairs = "pair" in s["worst_rows"][0]
        lines += [f"### The {len(s['worst_rows'])} rows with most wrong labels", "",
                  "Probabilities in brackets.", "",
                  table(["row", "wrong", "text"] + (["pair"] if pairs else []) + ["gold", "predicted",
                                                                                          "missed", "extra"],
                                 [[str(w["row"]), w["wrong"], shorten(w["text"], 90)]
                                  + ([shorten(w["pair"], 90)] if pairs else [])
                                  + [", ".join(w[key]) or "–" for key in ("gold", "predicted", "missed", "extra")]
                                  for w in s["worst_rows"]]), ""]
    return "\n".join(lines)


def _console(s: dict) -> list[str]:
    card = s["cardinality"]
    lines = [(f"multi-label on {s['split']}: F1 micro {s['micro_f1']:.3f}, macro {s['macro_f1']:.3f}, exact match "
             f"{number(s['exact_match'])} ({s['rows']:,} rows, {s['label_count']:,} labels)")]
    worst = sorted(s["per_label"].items(), key=lambda item: (item[1]["f1"], -item[1]["support"]))[:3]
    if worst:
        lines.append("worst labels: " + ", ".join(f"{plotting.short(label)} F1 {e['f1']:.3f} (n={e['support']:,})"
                                                  for label, e in worst))
    lines.append(f"labels per row: gold {number(card['gold_mean'], 2)}, "
                 f"predicted {number(card['predicted_mean'], 2)}")
    if s["never_predicted"]:
        names = ", ".join(plotting.short(label) for label in s["never_predicted"][:8])
        more = len(s["never_predicted"]) - 8
        lines.append(f"never predicted: {names}" + (f" and {more} more" if more > 0 else ""))
    return lines
