"""Regression: error metrics, residuals against the target (is the model biased at the extremes?), where
the error is largest by target range, and the worst predictions.

Residual = predicted - gold, so a positive residual is an over-estimate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import stats

from finetune.analysis import plotting
from finetune.analysis.outputs import Analysis, SplitOutputs
from finetune.analysis.text import clean, number, shorten, table

BUCKETS = 5
"""Target quantile buckets in the error-by-target table."""
CURVE_BINS = 20
"""Most bins of the binned mean-residual line on the residual plot."""


def error_metrics(gold: np.ndarray, predicted: np.ndarray) -> dict:
    """MAE, RMSE, R², Pearson, Spearman, bias (mean residual), median and max absolute error.

    A correlation or R² that is undefined (fewer than two rows, a constant side) is None.
    """
    residual = predicted - gold
    n = len(gold)
    if n == 0:
        return {key: None for key in ("mae", "rmse", "r2", "pearson", "spearman", "bias",
                                      "median_absolute_error", "max_absolute_error")}
    spread = float(np.sum((gold - gold.mean()) ** 2))
    varied = n >= 2 and np.ptp(gold) > 0 and np.ptp(predicted) > 0
    return {
        "mae": float(np.mean(np.abs(residual))),
        "rmse": float(np.sqrt(np.mean(residual ** 2))),
        "r2": 1.0 - float(np.sum(residual ** 2)) / spread if spread > 0 else None,
        "pearson": float(stats.pearsonr(gold, predicted)[0]) if varied else None,
        "spearman": float(stats.spearmanr(gold, predicted)[0]) if varied else None,
        "bias": float(np.mean(residual)),
        "median_absolute_error": float(np.median(np.abs(residual))),
        "max_absolute_error": float(np.max(np.abs(residual))),
    }


def quantile_buckets(gold: np.ndarray, count: int) -> np.ndarray:
    """Each row's bucket id (0 = lowest targets) over ``count`` target quantiles; tied edges merged."""
    if len(gold) == 0:
        return np.zeros(0, dtype=int)
    edges = np.unique(np.quantile(gold, np.linspace(0, 1, count + 1)))
    if len(edges) == 1:
        return np.zeros(len(gold), dtype=int)
    # Inner edges only: a value equal to an edge goes up, the maximum stays in the last bucket.
    return np.searchsorted(edges[1:-1], gold, side="right")


def bucket_table(gold: np.ndarray, predicted: np.ndarray, count: int = BUCKETS) -> list[dict]:
    """Per target quantile bucket: target range, rows, MAE, RMSE, bias."""
    buckets = quantile_buckets(gold, count)
    rows = []
    for b in np.unique(buckets):
        mask = buckets == b
        residual = predicted[mask] - gold[mask]
        rows.append({"bucket": int(b), "low": float(gold[mask].min()), "high": float(gold[mask].max()),
                     "rows": int(mask.sum()), "mae": float(np.mean(np.abs(residual))),
                     "rmse": float(np.sqrt(np.mean(residual ** 2))), "bias": float(np.mean(residual))})
    return rows


def analyze(outputs: SplitOutputs, folder: Path, k: int = 10) -> Analysis:
    """Metrics, error by target bucket, the k worst predictions, residual and predicted-vs-gold plots.

    Rows with a non-finite gold or prediction are counted (``non_finite_rows``) and left out of the rest.
    Writes ``regression_residuals.png`` and ``regression_predicted_vs_gold.png`` into ``folder``.

    Raises:
        ValueError: gold and predicted differ in length.
    """
    gold_all = np.asarray(outputs.gold, dtype=float).reshape(-1)
    predicted_all = np.asarray(outputs.predicted, dtype=float).reshape(-1)
    if gold_all.shape != predicted_all.shape:
        raise ValueError(f"{len(gold_all)} gold values but {len(predicted_all)} predictions")
    finite = np.isfinite(gold_all) & np.isfinite(predicted_all)
    rows = np.flatnonzero(finite)
    gold, predicted = gold_all[rows], predicted_all[rows]
    metrics = error_metrics(gold, predicted)
    buckets = bucket_table(gold, predicted)
    worst_bucket = max(buckets, key=lambda b: b["mae"]) if buckets else None
    order = np.argsort(-np.abs(predicted - gold), kind="stable")[:k]
    worst = [{"row": int(rows[i]), "gold": float(gold[i]), "predicted": float(predicted[i]),
              "error": float(predicted[i] - gold[i]), "text": shorten(outputs.texts[rows[i]], 300),
              **({"pair": shorten(outputs.pairs[rows[i]], 300)} if outputs.pairs else {})}
             for i in order]
    summary = {"task": outputs.task, "split": outputs.split, "model": outputs.model, "rows": len(gold_all),
               "non_finite_rows": int((~finite).sum()), **metrics,
               "gold_mean": float(gold.mean()) if len(gold) else None,
               "gold_std": float(gold.std()) if len(gold) else None,
               "predicted_mean": float(predicted.mean()) if len(gold) else None,
               "predicted_std": float(predicted.std()) if len(gold) else None,
               "by_target_bucket": buckets, "worst_bucket": worst_bucket, "worst": worst}
    figures = []
    if len(gold):
        folder = Path(folder)
        figures = [_residual_figure(outputs, gold, predicted, folder / "regression_residuals.png"),
                   _scatter_figure(outputs, gold, predicted, metrics, folder / "regression_predicted_vs_gold.png")]
    return Analysis(summary=clean(summary), markdown=_markdown(summary, figures),
                    console=_console(summary), figures=figures)


def _point_style(n: int) -> dict:
    # Many points: smaller and more transparent, so density stays visible.
    return {"s": 14 if n < 500 else 6, "alpha": float(np.clip(400 / max(n, 1), 0.08, 0.7)),
            "color": "#4c72b0", "linewidths": 0}


def _residual_figure(outputs: SplitOutputs, gold: np.ndarray, predicted: np.ndarray, path: Path) -> Path:
    residual = predicted - gold
    fig = plotting.new_figure(8.0, 5.0)
    ax = fig.add_subplot()
    ax.scatter(gold, residual, **_point_style(len(gold)), label="one row")
    ax.axhline(0.0, color="black", linewidth=1)
    bins = quantile_buckets(gold, max(1, min(CURVE_BINS, len(gold) // 10)))
    centres = [gold[bins == b].mean() for b in np.unique(bins)]
    means = [residual[bins == b].mean() for b in np.unique(bins)]
    ax.plot(centres, means, color="#dd8452", marker="o", linewidth=2, markersize=4,
            label="mean residual per target quantile bin")
    ax.set_xlabel("gold target")
    ax.set_ylabel("residual (predicted − gold)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(plotting.title_of(outputs.model, outputs.split, "Residual against target (above 0: over-estimate)"),
                 fontsize=10)
    return plotting.save(fig, path)


def _scatter_figure(outputs: SplitOutputs, gold: np.ndarray, predicted: np.ndarray, metrics: dict,
                    path: Path) -> Path:
    fig = plotting.new_figure(6.0, 6.0)
    ax = fig.add_subplot()
    ax.scatter(gold, predicted, **_point_style(len(gold)))
    low, high = float(min(gold.min(), predicted.min())), float(max(gold.max(), predicted.max()))
    pad = 0.03 * (high - low) or 0.5
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="black", linewidth=1, label="predicted = gold")
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_aspect("equal")
    ax.set_xlabel("gold target")
    ax.set_ylabel("predicted")
    ax.grid(alpha=0.3)
    note = ", ".join(f"{name} {number(metrics[key])}" for name, key in
                     (("MAE", "mae"), ("R²", "r2"), ("Pearson", "pearson"), ("Spearman", "spearman")))
    ax.legend(loc="upper left", fontsize=8, title=note, title_fontsize=8)
    ax.set_title(plotting.title_of(outputs.model, outputs.split, "Predicted against gold"), fontsize=10)
    return plotting.save(fig, path)


def _markdown(s: dict, figures: list[Path]) -> str:
    lines = [f"## Regression: {s['split']}", "",
             f"{s['rows']:,} rows. Residual = predicted − gold (positive: over-estimate).", ""]
    if s["non_finite_rows"]:
        lines += [(f"**{s['non_finite_rows']:,} rows have a non-finite gold value or prediction** and are left "
                  "out of everything below."), ""]
    lines += [table(["metric", "value"], [
        ["MAE", s["mae"]], ["RMSE", s["rmse"]], ["R²", s["r2"]], ["Pearson", s["pearson"]],
        ["Spearman", s["spearman"]], ["bias (mean residual)", s["bias"]],
        ["median absolute error", s["median_absolute_error"]], ["max absolute error", s["max_absolute_error"]]]), "",
        table(["", "mean", "std"], [["gold", s["gold_mean"], s["gold_std"]],
                                             ["predicted", s["predicted_mean"], s["predicted_std"]]]), ""]
    lines += [f"![{f.stem.replace('_', ' ')}]({f.name})" for f in figures] + [""]
    if s["by_target_bucket"]:
        lines += ["### Error by target quantile", "",
                  table(["targets", "rows", "MAE", "RMSE", "bias"], [
                      [f"{b['low']:.3g} – {b['high']:.3g}", b["rows"], b["mae"], b["rmse"], b["bias"]]
                      for b in s["by_target_bucket"]]), ""]
        w = s["worst_bucket"]
        lines += [(f"Largest error for targets {w['low']:.3g} – {w['high']:.3g} (MAE {w['mae']:.3f}, bias "
                  f"{w['bias']:+.3f})."), ""]
    if s["worst"]:
        pairs = "pair" in s["worst"][0]
        lines += [f"### The {len(s['worst'])} worst predictions", "",
                  table(["row", "gold", "predicted", "error", "text"] + (["pair"] if pairs else []), [
                      [str(w["row"]), w["gold"], w["predicted"], w["error"], shorten(w["text"], 100)]
                      + ([shorten(w["pair"], 100)] if pairs else []) for w in s["worst"]]), ""]
    return "\n".join(lines)


def _console(s: dict) -> list[str]:
    def f(key: str) -> str:
        return number(s[key])

    lines = [(f"regression on {s['split']}: MAE {f('mae')}, RMSE {f('rmse')}, R² {f('r2')}, Pearson {f('pearson')}, "
             f"Spearman {f('spearman')} ({s['rows']:,} rows)")]
    if s["non_finite_rows"]:
        lines.append(f"warning: {s['non_finite_rows']:,} rows with a non-finite gold value or prediction left out")
    if s["worst_bucket"]:
        w = s["worst_bucket"]
        lines.append(f"worst for targets {w['low']:.3g} – {w['high']:.3g}: MAE {w['mae']:.3f}, bias {w['bias']:+.3f}"
                     f" (overall bias {s['bias']:+.3f})")
    if s["worst"]:
        w = s["worst"][0]
        lines.append(f"worst row {w['row']}: gold {w['gold']:.3g}, predicted {w['predicted']:.3g}")
    return lines
