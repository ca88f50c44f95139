"""Token classification (NER-style tagging): entity-level scores per type, and what the errors are.

Entities are read from the tags the conlleval way, as the run's ``entity_f1`` (seqeval's default mode)
reads them: ``B-``/``I-`` (also ``E-``/``S-``, and BILOU's ``L-``/``U-``) prefixes, an ``I-`` after ``O``
or after another type starts an entity; a tag without a prefix (``PER``) is read as ``I-PER``, so a run
of equal plain tags is one entity. An entity is right only with its type, first and last word all right.

Every gold entity that is not predicted exactly is one error, classified by the predictions overlapping it:
``type`` (one has the same span, another type), ``boundary`` (one has the same type, another span),
``boundary_and_type`` (only other types on other spans), ``missed`` (none overlaps). Every predicted
entity overlapping no gold entity is one ``spurious`` error.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np

from finetune.analysis import plotting
from finetune.analysis.outputs import Analysis, SplitOutputs
from finetune.analysis.text import clean, shorten, table

ERROR_KINDS = ("boundary", "type", "boundary_and_type", "missed", "spurious")
_PREFIXES = {"B": "B", "I": "I", "E": "E", "S": "S", "L": "E", "U": "S"}  # BILOU read as BIOES
_CONTEXT = 6
"""Words kept on each side of a wrong word in the printed examples; longer stretches are cut."""


class Span(NamedTuple):
    type: str
    start: int
    end: int  # inclusive

    def overlaps(self, other: Span) -> bool:
        return self.start <= other.end and other.start <= self.end

    def same_extent(self, other: Span) -> bool:
        return self.start == other.start and self.end == other.end


class EntityError(NamedTuple):
    row: int
    kind: str
    gold: Span | None
    predicted: Span | None


def parse_tag(tag: str) -> tuple[str, str]:
    """``"B-PER"`` -> ``("B", "PER")``; ``"O"`` -> ``("O", "")``; a plain ``"PER"`` -> ``("I", "PER")``."""
    if tag in ("O", ""):
        return "O", ""
    if len(tag) > 2 and tag[1] in "-_" and tag[0] in _PREFIXES:
        return _PREFIXES[tag[0]], tag[2:]
    return "I", tag


def entity_spans(tags: list[str]) -> list[Span]:
    """The entities of one sentence's tags, in order, as (type, first word, last word)."""
    spans, open_type, start, previous = [], None, 0, "O"
    for i, (prefix, type_) in enumerate([parse_tag(t) for t in tags] + [("O", "")]):
        if open_type is not None and (prefix in ("O", "B", "S") or type_ != open_type or previous in ("E", "S")):
            spans.append(Span(open_type, start, i - 1))
            open_type = None
        if prefix != "O" and open_type is None:
            open_type, start = type_, i
        previous = prefix
    return spans


def classify_errors(row: int, gold: list[Span], predicted: list[Span]) -> list[EntityError]:
    """The errors of one sentence (see the module docstring for the categories)."""
    exact = set(gold) & set(predicted)
    wrong_predictions = [p for p in predicted if p not in exact]
    errors = []
    for g in (g for g in gold if g not in exact):
        overlapping = [p for p in wrong_predictions if p.overlaps(g)]
        same_extent = [p for p in overlapping if p.same_extent(g)]
        same_type = [p for p in overlapping if p.type == g.type]
        if same_extent:
            errors.append(EntityError(row, "type", g, same_extent[0]))
        elif same_type:
            errors.append(EntityError(row, "boundary", g, same_type[0]))
        elif overlapping:
            most = max(overlapping, key=lambda p: min(p.end, g.end) - max(p.start, g.start))
            errors.append(EntityError(row, "boundary_and_type", g, most))
        else:
            errors.append(EntityError(row, "missed", g, None))
    errors += [EntityError(row, "spurious", None, p) for p in wrong_predictions
               if not any(p.overlaps(g) for g in gold)]
    return errors


def boundary_detail(error: EntityError) -> str:
    """How a same-type prediction's span differs: ``too_short`` (inside), ``too_long`` (around), ``shifted``."""
    g, p = error.gold, error.predicted
    if g.start <= p.start and p.end <= g.end:
        return "too_short"
    if p.start <= g.start and g.end <= p.end:
        return "too_long"
    return "shifted"


def prf(correct: int, predicted: int, gold: int) -> tuple[float, float, float]:
    """Precision, recall, F1 from counts; 0.0 where a denominator is 0 (as seqeval and the run's metrics)."""
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * correct / (predicted + gold) if predicted + gold else 0.0
    return precision, recall, f1


def entity_scores(gold_rows: list[list[Span]], predicted_rows: list[list[Span]]) -> dict:
    """Overall (micro) and per-type precision/recall/F1 with support (gold count) and predicted count."""
    counts: dict[str, Counter] = {}
    for gold, predicted in zip(gold_rows, predicted_rows):
        exact = set(gold) & set(predicted)
        for key, spans in (("gold", gold), ("predicted", predicted), ("correct", exact)):
            for span in spans:
                counts.setdefault(span.type, Counter())[key] += 1
    per_type = {}
    for type_ in sorted(counts):
        c = counts[type_]
        precision, recall, f1 = prf(c["correct"], c["predicted"], c["gold"])
        per_type[type_] = {"precision": precision, "recall": recall, "f1": f1,
                           "support": c["gold"], "predicted": c["predicted"], "correct": c["correct"]}
    total = Counter()
    for c in counts.values():
        total.update(c)
    precision, recall, f1 = prf(total["correct"], total["predicted"], total["gold"])
    return {"precision": precision, "recall": recall, "f1": f1, "gold": total["gold"],
            "predicted": total["predicted"], "correct": total["correct"], "per_type": per_type}


def analyze(outputs: SplitOutputs, folder: Path, k: int = 10) -> Analysis:
    """Entity scores per type, error categories, frequent confusions and the k sentences with most errors.

    Writes ``token_entity_f1.png`` into ``folder``.

    Raises:
        ValueError: a row's gold and predicted tags differ in length, or the outputs have no labels.
    """
    if not outputs.labels:
        raise ValueError("token classification outputs need their tag names (labels)")
    labels = list(outputs.labels)
    gold_tags, predicted_tags = [], []
    for row, (gold, predicted) in enumerate(zip(outputs.gold, outputs.predicted)):
        if len(gold) != len(predicted):
            raise ValueError(f"row {row}: {len(gold)} gold tags but {len(predicted)} predicted tags")
        gold_tags.append([labels[int(i)] for i in gold])
        predicted_tags.append([labels[int(i)] for i in predicted])
    gold_spans = [entity_spans(tags) for tags in gold_tags]
    predicted_spans = [entity_spans(tags) for tags in predicted_tags]
    scores = entity_scores(gold_spans, predicted_spans)
    words = sum(len(tags) for tags in gold_tags)
    right_words = sum(int(np.sum(np.asarray(g) == np.asarray(p))) for g, p in zip(outputs.gold, outputs.predicted))
    errors = [e for row, (g, p) in enumerate(zip(gold_spans, predicted_spans)) for e in classify_errors(row, g, p)]

    kinds = Counter(e.kind for e in errors)
    confusions = Counter((e.kind, e.gold.type if e.gold else None, e.predicted.type if e.predicted else None)
                         for e in errors)
    summary = {
        "task": outputs.task, "split": outputs.split, "model": outputs.model,
        "rows": len(gold_tags), "words": words, "scheme": _scheme(labels),
        "token_accuracy": right_words / words if words else None,
        "entity_precision": scores["precision"], "entity_recall": scores["recall"], "entity_f1": scores["f1"],
        "entity_f1_macro": (float(np.mean([s["f1"] for s in scores["per_type"].values()]))
                            if scores["per_type"] else None),
        "entities_gold": scores["gold"], "entities_predicted": scores["predicted"],
        "entities_correct": scores["correct"],
        "per_type": scores["per_type"],
        "never_predicted": [t for t, s in scores["per_type"].items() if s["predicted"] == 0],
        "errors": {kind: kinds.get(kind, 0) for kind in ERROR_KINDS},
        "boundary_errors": dict(Counter(boundary_detail(e) for e in errors if e.kind == "boundary")),
        "confusions": [{"kind": kind, "gold": g, "predicted": p, "count": n}
                       for (kind, g, p), n in confusions.most_common(max(k, 10))],
        "examples": _examples(outputs, gold_tags, predicted_tags, errors, k),
    }
    figures = []
    if scores["per_type"]:
        figures.append(_f1_figure(outputs, scores["per_type"], Path(folder) / "token_entity_f1.png"))
    return Analysis(summary=clean(summary), markdown=_markdown(summary, figures),
                    console=_console(summary), figures=figures)


def _scheme(labels: list[str]) -> str:
    prefixes = {parse_tag(t)[0] for t in labels if t not in ("O", "")}
    plain = any(parse_tag(t)[1] == t for t in labels if t not in ("O", ""))
    if plain:
        return "plain tags (runs of one tag are entities)" if len(prefixes) == 1 else "mixed prefixed and plain tags"
    return "BIOES" if prefixes & {"E", "S"} else "BIO"


def _examples(outputs: SplitOutputs, gold_tags: list[list[str]], predicted_tags: list[list[str]],
              errors: list[EntityError], k: int) -> list[dict]:
    """The k rows with most entity errors (then most wrong words), each word marked where the tags differ."""
    by_row: dict[int, list[EntityError]] = {}
    for e in errors:
        by_row.setdefault(e.row, []).append(e)

    def wrong_words(row: int) -> int:
        return sum(g != p for g, p in zip(gold_tags[row], predicted_tags[row]))

    rows = sorted(by_row, key=lambda r: (-len(by_row[r]), -wrong_words(r), r))[:k]
    examples = []
    for row in rows:
        words = [str(w) for w in outputs.texts[row]][: len(gold_tags[row])]
        examples.append({"row": row, "errors": len(by_row[row]), "wrong_words": wrong_words(row),
                         "marked": _marked(words, gold_tags[row], predicted_tags[row]),
                         "what": [_describe(e, words) for e in by_row[row]]})
    return examples


def _marked(words: list[str], gold: list[str], predicted: list[str]) -> str:
    """The sentence with ``word[gold|predicted]`` where the tags differ; long right stretches cut to ``…``."""
    wrong = [i for i, (g, p) in enumerate(zip(gold, predicted)) if g != p]
    keep = {j for i in wrong for j in range(i - _CONTEXT, i + _CONTEXT + 1)}
    parts, cut = [], False
    for i, word in enumerate(words):
        if i not in keep:
            if not cut:
                parts.append("…")
            cut = True
            continue
        cut = False
        parts.append(f"{word}[{gold[i]}|{predicted[i]}]" if gold[i] != predicted[i] else word)
    return " ".join(parts)


def _describe(error: EntityError, words: list[str]) -> str:
    def text(span: Span) -> str:
        return shorten(" ".join(words[span.start: span.end + 1]), 40)

    g, p = error.gold, error.predicted
    if error.kind == "missed":
        return f"missed {g.type} '{text(g)}'"
    if error.kind == "spurious":
        return f"spurious {p.type} '{text(p)}'"
    if error.kind == "type":
        return f"{g.type} as {p.type} '{text(g)}'"
    if error.kind == "boundary":
        return f"{g.type} '{text(g)}' predicted as '{text(p)}'"
    return f"{g.type} '{text(g)}' predicted as {p.type} '{text(p)}'"


def _confusion_phrase(c: dict) -> str:
    return {"type": f"{c['gold']} predicted as {c['predicted']} (same span)",
            "boundary_and_type": f"{c['gold']} predicted as {c['predicted']} (other span)",
            "boundary": f"{c['gold']} with wrong boundaries",
            "missed": f"{c['gold']} missed",
            "spurious": f"{c['predicted']} predicted where there is none"}[c["kind"]]


def _f1_figure(outputs: SplitOutputs, per_type: dict, path: Path) -> Path:
    names = list(per_type)
    return plotting.score_bars(
        names, [per_type[t]["f1"] for t in names], [per_type[t]["precision"] for t in names],
        [per_type[t]["recall"] for t in names], [per_type[t]["support"] for t in names],
        plotting.title_of(outputs.model, outputs.split, "Entity F1 per type"), path)


def _markdown(s: dict, figures: list[Path]) -> str:
    lines = [f"## Token classification: {s['split']}", "",
             (f"{s['rows']:,} sentences, {s['words']:,} words, {s['entities_gold']:,} gold entities, "
             f"{s['entities_predicted']:,} predicted ({s['scheme']}). Entity-level scores need the type, "
             "first and last word all right (as the run's `entity_f1`)."), "",
             table(["metric", "value"], [
                 ["entity F1 (micro)", s["entity_f1"]], ["entity precision", s["entity_precision"]],
                 ["entity recall", s["entity_recall"]], ["entity F1 (macro over types)", s["entity_f1_macro"]],
                 ["token accuracy", s["token_accuracy"]]]), "",
             "### Per entity type", "",
             table(["type", "precision", "recall", "F1", "support", "predicted"], [
                 [t, v["precision"], v["recall"], v["f1"], v["support"], v["predicted"]]
                 for t, v in sorted(s["per_type"].items(), key=lambda item: item[1]["f1"])]), ""]
    if s["never_predicted"]:
        lines += [f"Never predicted: {', '.join(s['never_predicted'])}.", ""]
    lines += [f"![Entity F1 per type]({f.name})" for f in figures] + [""]
    errors, total = s["errors"], sum(s["errors"].values())
    meaning = {"boundary": "same type, overlapping, other span", "type": "same span, other type",
               "boundary_and_type": "overlapping, other type and span", "missed": "no prediction overlaps it",
               "spurious": "predicted, overlaps no gold entity"}
    lines += ["### Errors", "",
              ("Each gold entity not predicted exactly is one error, by the predictions overlapping it; each "
              "prediction overlapping no gold entity is a spurious one."), "",
              table(["error", "count", "share", "meaning"],
                             [[kind, errors[kind], errors[kind] / total if total else None, meaning[kind]]
                              for kind in ERROR_KINDS]), ""]
    if s["boundary_errors"]:
        detail = ", ".join(f"{name.replace('_', ' ')} {n:,}" for name, n in sorted(s["boundary_errors"].items()))
        lines += [f"Boundary errors: predicted span {detail}.", ""]
    if s["confusions"]:
        lines += ["Most frequent errors:", "",
                  table(["error", "count"], [[_confusion_phrase(c), c["count"]] for c in s["confusions"]]),
                  ""]
    if s["examples"]:
        lines += [f"### The {len(s['examples'])} sentences with most errors", "",
                  "`word[gold|predicted]` marks a word whose tags differ; `…` cuts a stretch tagged right.", "",
                  "```text"]
        for ex in s["examples"]:
            lines += [f"row {ex['row']}: {ex['errors']} errors: {'; '.join(ex['what'])}", f"  {ex['marked']}", ""]
        lines[-1] = "```"
        lines.append("")
    return "\n".join(lines)


def _console(s: dict) -> list[str]:
    lines = [(f"token classification on {s['split']}: entity F1 {s['entity_f1']:.3f} "
             f"(P {s['entity_precision']:.3f}, R {s['entity_recall']:.3f}), token accuracy "
             f"{_or_dash(s['token_accuracy'])}, {s['entities_gold']:,} gold entities")]
    worst = sorted(s["per_type"].items(), key=lambda item: item[1]["f1"])[:3]
    if worst:
        lines.append("worst types: " + ", ".join(f"{t} F1 {v['f1']:.3f} (n={v['support']:,})" for t, v in worst))
    if any(s["errors"].values()):
        lines.append("errors: " + ", ".join(f"{kind.replace('_and_', '+')} {n:,}" for kind, n in s["errors"].items()))
        lines.append("most frequent: " + "; ".join(f"{_confusion_phrase(c)}: {c['count']:,}"
                                                   for c in s["confusions"][:3]))
    return lines


def _or_dash(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
