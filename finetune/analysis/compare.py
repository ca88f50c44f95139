"""Two single-label classifiers on the same rows (``finetune analyze A --compare B``): per-class F1 of both
and their difference, how many rows only one of them gets right, McNemar's exact test on those counts,
and the rows where their predictions differ.

McNemar's exact test: of the n = b + c rows exactly one model gets right (b only A, c only B), under
"both models are equally often right" each is A's with probability 1/2, so the two-sided p-value is
min(1, 2 * P(X <= min(b, c))) for X ~ Binomial(n, 1/2) (1 when n = 0). Rows both get right or both get
wrong say nothing about which is better.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finetune.analysis.classification import confusion_matrix, headline, per_class
from finetune.analysis.outputs import Analysis, SplitOutputs
from finetune.analysis.text import input_text, shorten, table
from finetune.errors import RecipeError


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact (binomial) McNemar p-value from the discordant counts."""
    from scipy.stats import binom

    n = only_a + only_b
    return 1.0 if n == 0 else float(min(1.0, 2 * binom.cdf(min(only_a, only_b), n, 0.5)))


def check_comparable(a: SplitOutputs, b: SplitOutputs) -> None:
    """Raises RecipeError unless both are single-label classification outputs on the same rows and labels."""
    if a.task != "classification" or b.task != "classification":
        raise RecipeError(f"--compare: compares single-label classification models; {a.model} is {a.task}, "
                          f"{b.model} is {b.task}")
    if list(a.labels) != list(b.labels):
        raise RecipeError(f"--compare: the models have different labels ({a.model}: {a.labels}; {b.model}: "
                          f"{b.labels}); both must know the same classes")
    if a.split != b.split or len(a) != len(b) or not np.array_equal(np.asarray(a.gold), np.asarray(b.gold)):
        raise RecipeError(f"--compare: {a.model} and {b.model} were not scored on the same rows ({a.split}: "
                          f"{len(a)} rows, {b.split}: {len(b)} rows, or other gold labels)")


def compare(a: SplitOutputs, b: SplitOutputs, k: int = 10) -> Analysis:
    """The comparison section (markdown, JSON, console lines) of ``a`` against ``b``."""
    check_comparable(a, b)
    labels, gold = list(a.labels), np.asarray(a.gold)
    name_a, name_b = _names(a.model, b.model)
    predicted_a, predicted_b = np.asarray(a.predicted), np.asarray(b.predicted)
    confusion_a, confusion_b = (confusion_matrix(gold, p, len(labels)) for p in (predicted_a, predicted_b))
    f1_a, f1_b = per_class(confusion_a)["f1"], per_class(confusion_b)["f1"]
    support = confusion_a.sum(1)
    classes = [{"label": labels[c], "f1_a": float(f1_a[c]), "f1_b": float(f1_b[c]),
                "difference": float(f1_b[c] - f1_a[c]), "support": int(support[c])} for c in range(len(labels))]
    right_a, right_b = predicted_a == gold, predicted_b == gold
    counts = {"both_right": int((right_a & right_b).sum()), "only_a_right": int((right_a & ~right_b).sum()),
              "only_b_right": int((~right_a & right_b).sum()), "both_wrong": int((~right_a & ~right_b).sum())}
    p_value = mcnemar_exact(counts["only_a_right"], counts["only_b_right"])
    overall = {"a": headline(confusion_a), "b": headline(confusion_b)}
    rows = _disagreements(a, b, k)
    summary = {"a": a.model, "b": b.model, "split": a.split, "rows": len(a), "metrics": overall, **counts,
               "disagreements": int((predicted_a != predicted_b).sum()), "mcnemar_exact_p": p_value,
               "per_class": classes, "examples": rows}
    return Analysis(summary, _markdown(summary, name_a, name_b), _console(summary, name_a, name_b))


def _names(model_a: str, model_b: str) -> tuple[str, str]:
    a, b = Path(model_a).name or model_a, Path(model_b).name or model_b
    return (a, b) if a != b else (f"{a} (A)", f"{b} (B)")


def _disagreements(a: SplitOutputs, b: SplitOutputs, k: int) -> list[dict]:
    """Up to k rows where the predictions differ, those where both models were most sure first."""
    index = np.arange(len(a))
    predicted_a, predicted_b = np.asarray(a.predicted), np.asarray(b.predicted)
    confidence_a = np.asarray(a.probabilities)[index, predicted_a]
    confidence_b = np.asarray(b.probabilities)[index, predicted_b]
    differ = np.flatnonzero(predicted_a != predicted_b)
    chosen = differ[np.argsort(-np.minimum(confidence_a, confidence_b)[differ], kind="stable")][:k]
    labels, gold = a.labels, np.asarray(a.gold)
    return [{"row": int(i) + 1, "text": input_text(a, i, 160), "gold": labels[gold[i]],
             "a": labels[predicted_a[i]], "a_confidence": float(confidence_a[i]),
             "b": labels[predicted_b[i]], "b_confidence": float(confidence_b[i])} for i in chosen]


def _markdown(s: dict, name_a: str, name_b: str) -> str:
    a, b = s["metrics"]["a"], s["metrics"]["b"]
    by_change = sorted(s["per_class"], key=lambda c: (-abs(c["difference"]), c["label"]))
    parts = [
        f"## Comparison: {name_a} (A) and {name_b} (B)",
        f"Same {s['split']} split, {s['rows']} rows. B is `{s['b']}`.",
        table(["", "accuracy", "macro F1", "weighted F1"],
              [[name, f"{m['accuracy']:.4f}", f"{m['f1_macro']:.4f}", f"{m['f1_weighted']:.4f}"]
               for name, m in ((f"A: {name_a}", a), (f"B: {name_b}", b))]),
        f"Both right {s['both_right']}, only A right **{s['only_a_right']}**, only B right **{s['only_b_right']}**, "
        f"both wrong {s['both_wrong']}; the predictions differ on {s['disagreements']} rows. McNemar's exact test "
        f"(are A and B equally often right?): p = **{s['mcnemar_exact_p']:.4g}**"
        + (" (a difference this large is unlikely by chance)." if s["mcnemar_exact_p"] < 0.05 else
           " (no evidence that one model is right more often)."),
        "### Per-class F1 (largest difference first)",
        table(["class", "F1 A", "F1 B", "B − A", "support"],
              [[c["label"], f"{c['f1_a']:.3f}", f"{c['f1_b']:.3f}", f"{c['difference']:+.3f}", c["support"]]
               for c in by_change]),
        "### Rows where they disagree (both most sure first)",
        table(["row", "text", "gold", "A", "B"],
              [[r["row"], r["text"], r["gold"], f"{r['a']} ({r['a_confidence']:.2f})",
                f"{r['b']} ({r['b_confidence']:.2f})"] for r in s["examples"]]) if s["examples"] else "None.",
    ]
    return "\n\n".join(parts)


def _console(s: dict, name_a: str, name_b: str) -> list[str]:
    a, b = s["metrics"]["a"], s["metrics"]["b"]
    moved = sorted((c for c in s["per_class"] if c["difference"]), key=lambda c: -abs(c["difference"]))[:3]
    lines = [(f"compare: accuracy {a['accuracy']:.4f} ({name_a}) vs {b['accuracy']:.4f} ({name_b}); only "
              f"{name_a} right {s['only_a_right']}, only {name_b} right {s['only_b_right']}; McNemar exact "
              f"p = {s['mcnemar_exact_p']:.4g}")]
    if moved:
        lines.append(f"largest per-class F1 differences ({name_b} − {name_a}): " + ", ".join(
            f"{shorten(c['label'], 24)} {c['difference']:+.2f}" for c in moved))
    return lines
