"""Single-label classification: per-class precision/recall/F1, the confusion matrix (clustered so classes
confused with each other sit together, legible up to ~100 classes), the most-confused pairs, the most
confident errors and least confident correct predictions, calibration, and the metric by input length and
by any column the user names.

Macro F1 averages over the classes present in the gold labels or the predictions (as scikit-learn and the
run's ``f1_macro`` do); the per-class table lists every class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from finetune.analysis import calibration
from finetune.analysis.outputs import Analysis, SplitOutputs
from finetune.analysis.plotting import new_figure, save
from finetune.analysis.slices import by_group, groups_by_value, input_words
from finetune.analysis.text import input_text, number, shorten, table

LABEL_WIDTH = 24  # characters of a class name on the confusion matrix's axes
ANNOTATED_UP_TO = 20  # classes: above this the cells carry no numbers (they would not fit)


def confusion_matrix(gold: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(gold), np.asarray(predicted)), 1)
    return counts


def per_class(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """precision, recall, f1, support and predicted counts per class (0 where undefined, as sklearn's
    ``zero_division=0``)."""
    hits, support, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, hits / np.maximum(predicted, 1), 0.0)
        recall = np.where(support > 0, hits / np.maximum(support, 1), 0.0)
        f1 = np.where(hits > 0, 2 * hits / np.maximum(support + predicted, 1), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support, "predicted": predicted}


def headline(confusion: np.ndarray) -> dict[str, float]:
    """accuracy, macro and weighted averages (macro over classes seen in gold or predictions)."""
    scores, total = per_class(confusion), confusion.sum()
    present = (scores["support"] + scores["predicted"]) > 0
    weights = scores["support"] / max(total, 1)
    result = {"accuracy": float(np.trace(confusion) / max(total, 1))}
    for name in ("precision", "recall", "f1"):
        result[f"{name}_macro"] = float(scores[name][present].mean()) if present.any() else 0.0
        result[f"{name}_weighted"] = float((scores[name] * weights).sum())
    return result


def cluster_order(confusion: np.ndarray) -> list[int]:
    """Class order for the matrix: average-linkage clustering on the symmetric confusion rate
    (r_ij + r_ji, r row-normalised), leaves in optimal order, so pairs confused either way sit together."""
    from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
    from scipy.spatial.distance import squareform

    n = len(confusion)
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    similarity = rates + rates.T
    np.fill_diagonal(similarity, 0)
    if n <= 2 or similarity.max() == 0:
        return list(range(n))
    distance = 1 - similarity / similarity.max()
    np.fill_diagonal(distance, 0)
    condensed = squareform(distance, checks=False)
    tree = linkage(condensed, method="average")
    return [int(i) for i in leaves_list(optimal_leaf_ordering(tree, condensed))]


def confused_pairs(confusion: np.ndarray, labels: list[str], k: int) -> list[dict]:
    """The k largest off-diagonal cells: true class, predicted class, count, share of the true class."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    cells = [(int(off[i, j]), i, j) for i, j in zip(*np.nonzero(off))]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    support = confusion.sum(1)
    return [{"true": labels[i], "predicted": labels[j], "count": count, "share_of_true": count / support[i]}
            for count, i, j in cells[:k]]


def plot_confusion(confusion: np.ndarray, labels: list[str], order: list[int], path: Path, title: str) -> Path:
    """Row-normalised, the classes in ``order`` (others left out); cell size, fonts and figure size follow the
    class count, so 77 classes stay legible; a square-root colour scale makes a few per cent of confusion visible."""
    from matplotlib.colors import PowerNorm

    n = len(order)
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    shown = rates[np.ix_(order, order)]
    names = [_middle(labels[i], LABEL_WIDTH) for i in order]
    cell, font = (0.55, 10) if n <= 10 else (0.34, 8) if n <= 30 else (0.2, 6.5)  # inches per cell, points
    # margins in inches, from the longest name (~0.62 em per character), so no second layout pass is needed
    labels_room = max(len(s) for s in names) * font * 0.62 / 72 + 0.45
    side, top, right = max(n * cell, 2.5), 0.6, 1.4
    width, height = labels_room + side + right, labels_room + side + top
    figure = new_figure(width, height, layout=None)
    ax = figure.add_axes((labels_room / width, labels_room / height, side / width, side / height))
    image = ax.imshow(shown, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest",
                      aspect="auto")
    ax.set_xticks(range(n), names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), names, fontsize=font)
    edges = np.arange(n + 1) - 0.5
    ax.vlines(edges, -0.5, n - 0.5, color="#dddddd", linewidth=0.4)
    ax.hlines(edges, -0.5, n - 0.5, color="#dddddd", linewidth=0.4)
    ax.set_xlabel("predicted class", fontsize=max(font + 2, 11))
    ax.set_ylabel("true class", fontsize=max(font + 2, 11))
    ax.set_title(title, fontsize=max(font + 3, 12))
    if n <= ANNOTATED_UP_TO:
        for i in range(n):
            for j in range(n):
                if confusion[order[i], order[j]]:
                    ax.text(j, i, f"{shown[i, j]:.2f}", ha="center", va="center", fontsize=font - 1,
                            color="white" if shown[i, j] > 0.5 else "black")
    bar_axes = figure.add_axes(((labels_room + side + 0.2) / width, labels_room / height, 0.2 / width, side / height))
    bar = figure.colorbar(image, cax=bar_axes)
    bar.set_label("share of the true class (square-root scale)", fontsize=font + 1)
    bar.ax.tick_params(labelsize=font)
    return save(figure, path, dpi=110 if n <= 30 else 150)


def _middle(label: str, width: int) -> str:
    """A class name cut in the middle (names often differ only at the end: card_payment_fee_charged)."""
    label = " ".join(str(label).split())
    if len(label) <= width:
        return label
    head = (width - 1) * 3 // 5
    return label[:head] + "…" + label[len(label) - (width - 1 - head):]


def examples(outputs: SplitOutputs, k: int) -> tuple[list[dict], list[dict]]:
    """The k most confident errors and the k least confident correct predictions."""
    gold, predicted = np.asarray(outputs.gold), np.asarray(outputs.predicted)
    probabilities = np.asarray(outputs.probabilities, dtype=np.float64)
    confidence = probabilities[np.arange(len(gold)), predicted]
    wrong = np.flatnonzero(predicted != gold)
    right = np.flatnonzero(predicted == gold)

    def row(i: int) -> dict:
        return {"row": int(i) + 1, "text": input_text(outputs, i, 200), "gold": outputs.labels[gold[i]],
                "predicted": outputs.labels[predicted[i]], "confidence": float(confidence[i]),
                "p_gold": float(probabilities[i, gold[i]])}

    errors = wrong[np.argsort(-confidence[wrong], kind="stable")][:k]
    unsure = right[np.argsort(confidence[right], kind="stable")][:k]
    return [row(i) for i in errors], [row(i) for i in unsure]


def analyze(outputs: SplitOutputs, folder: Path, k: int = 10, slices: Sequence[str] = ()) -> Analysis:
    """The classification report (see the module docstring); figures go to ``folder``."""
    folder, labels = Path(folder), list(outputs.labels)
    gold, predicted = np.asarray(outputs.gold), np.asarray(outputs.predicted)
    probabilities = np.asarray(outputs.probabilities, dtype=np.float64)
    confusion = confusion_matrix(gold, predicted, len(labels))
    scores, overall = per_class(confusion), headline(confusion)
    order = cluster_order(confusion)
    shown = [c for c in order if scores["support"][c] or scores["predicted"][c]]  # absent classes: empty rows
    name = Path(outputs.model).name or outputs.model
    plot_confusion(confusion, labels, shown, folder / "confusion.png",
                   f"{name}: {outputs.split}, {len(gold)} rows (row-normalised)")
    pairs = confused_pairs(confusion, labels, k)
    errors, unsure = examples(outputs, k)
    calibrated = calibration.summary(probabilities, gold, predicted)
    curves = {"this model" if outputs.temperature is None else f"temperature {outputs.temperature:.3g}":
              calibrated["bins"]}
    if outputs.temperature is not None:  # what the model gave before its temperature
        raw = calibration.summary(calibration.scale(probabilities, 1 / outputs.temperature), gold, predicted)
        calibrated["without_temperature"] = {key: raw[key] for key in ("ece", "nll", "mean_confidence")}
        curves["without temperature"] = raw["bins"]
    calibrated["temperature"] = outputs.temperature
    calibration.plot_reliability(curves, folder / "reliability.png",
                                 f"{name}: {outputs.split}, ECE {calibrated['ece']:.3f} ({calibration.BINS} bins)")

    def group_scores(inside: np.ndarray) -> dict[str, float]:
        scores = headline(confusion_matrix(gold[inside], predicted[inside], len(labels)))
        return {"accuracy": scores["accuracy"], "f1_macro": scores["f1_macro"]}

    by_length = by_group(*groups_by_value(input_words(outputs)), group_scores)
    sliced = {column: by_group(*groups_by_value(outputs.columns[column]), group_scores) for column in slices}
    classes = [{"label": labels[c], **{key: scores[key][c].item() for key in scores}} for c in range(len(labels))]
    summary = {**overall, "per_class": classes,
               "confusion": {"order": order, "shown": shown, "counts": confusion.tolist()},
               "confused_pairs": pairs, "confident_errors": errors, "unsure_correct": unsure,
               "calibration": calibrated, "by_length": by_length, "slices": sliced}
    markdown = _markdown(outputs, overall, classes, pairs, errors, unsure, calibrated, by_length, sliced)
    return Analysis(summary, markdown, _console(outputs, overall, classes, pairs, calibrated),
                    [folder / "confusion.png", folder / "reliability.png"])


def _markdown(outputs, overall, classes, pairs, errors, unsure, calibrated, by_length, sliced) -> str:
    worst_first = sorted(classes, key=lambda c: (not c["support"], c["f1"], -c["support"]))  # absent classes last
    class_rows = [[c["label"], number(c["precision"] if c["predicted"] else None),  # – : undefined (0 in the JSON)
                   number(c["recall"] if c["support"] else None),
                   number(c["f1"] if c["support"] or c["predicted"] else None), c["support"], c["predicted"]]
                  for c in worst_first]
    class_rows += [[f"**{kind} average**", number(overall[f"precision_{kind}"]), number(overall[f"recall_{kind}"]),
                    number(overall[f"f1_{kind}"]), len(outputs), ""] for kind in ("macro", "weighted")]
    parts = [
        "## Classification",
        (f"Accuracy **{overall['accuracy']:.3f}**, macro F1 **{overall['f1_macro']:.3f}**, weighted F1 "
         f"{overall['f1_weighted']:.3f} over {len(outputs)} rows and {len(classes)} classes."),
        ("### Per class (worst F1 first; – where undefined: a class never predicted has no precision, one "
         "absent from the split no recall)"),
        table(["class", "precision", "recall", "F1", "support", "predicted"], class_rows),
        "### Confusion matrix",
        ("Each row is a true class, divided by its support; classes are ordered by hierarchical clustering of the "
         "confusion, so classes mistaken for each other sit together."),
        "![confusion matrix](confusion.png)" + _left_out(classes),
        "### Most confused pairs",
        table(["true class", "predicted as", "rows", "share of the true class"],
              [[p["true"], p["predicted"], p["count"], f"{p['share_of_true']:.1%}"] for p in pairs])
        if pairs else "No errors.",
        "### Most confident errors",
        _example_table(errors) if errors else "No errors.",
        "### Least confident correct predictions",
        _example_table(unsure) if unsure else "No correct predictions.",
        "### Calibration",
        _calibration_text(calibrated),
        "![reliability diagram](reliability.png)",
        "### By input length (words)",
        _group_table(by_length, "words"),
    ]
    for column, rows in sliced.items():
        parts += [f"### By `{column}`", _group_table(rows, column)]
    return "\n\n".join(parts)


def _left_out(classes: list[dict]) -> str:
    absent = [c["label"] for c in classes if not c["support"] and not c["predicted"]]
    return (f"\n\nLeft out of the figure: {len(absent)} classes neither in this split nor predicted "
            f"({', '.join(absent)}).") if absent else ""


def _example_table(rows: list[dict]) -> str:
    return table(["row", "text", "gold", "predicted", "confidence", "p(gold)"],
                 [[r["row"], r["text"], r["gold"], r["predicted"], f"{r['confidence']:.3f}", f"{r['p_gold']:.3f}"]
                  for r in rows])


def _group_table(rows: list[dict], what: str) -> str:
    return table([what, "rows", "accuracy", "macro F1"],
                 [[r["group"], r["rows"], number(r["accuracy"]), number(r["f1_macro"])] for r in rows])


def _calibration_text(c: dict) -> str:
    text = (f"Expected calibration error (ECE, {calibration.BINS} equal-width confidence bins) **{c['ece']:.4f}**; "
            f"negative log-likelihood {c['nll']:.4f}; mean confidence {c['mean_confidence']:.3f} against accuracy "
            f"{c['accuracy']:.3f}.")
    if c["temperature"] is not None:
        before = c["without_temperature"]
        text += (f" These probabilities are divided by the run's temperature {c['temperature']:.4g} "
                 f"(`calibration.json`); without it: ECE {before['ece']:.4f}, NLL {before['nll']:.4f}.")
    return text


def _console(outputs, overall, classes, pairs, calibrated) -> list[str]:
    name = Path(outputs.model).name or outputs.model
    lines = [f"{name}: {outputs.split} split, {len(outputs)} rows, {len(classes)} classes",
             (f"accuracy {overall['accuracy']:.4f}  macro F1 {overall['f1_macro']:.4f}  "
              f"weighted F1 {overall['f1_weighted']:.4f}")]
    worst = sorted((c for c in classes if c["support"]), key=lambda c: (c["f1"], -c["support"]))[:5]
    lines.append("worst classes (F1): " + ", ".join(f"{shorten(c['label'], 24)} {c['f1']:.2f} (n={c['support']})"
                                                     for c in worst))
    if pairs:
        lines.append("most confused: " + "; ".join(f"{shorten(p['true'], 24)} → {shorten(p['predicted'], 24)} "
                                                   f"{p['count']} ({p['share_of_true']:.0%})" for p in pairs[:3]))
    line = f"calibration: ECE {calibrated['ece']:.4f} ({calibration.BINS} bins), NLL {calibrated['nll']:.4f}"
    if calibrated["temperature"] is not None:
        line += (f" with temperature {calibrated['temperature']:.3g} (without: ECE "
                 f"{calibrated['without_temperature']['ece']:.4f})")
    return [*lines, line]
