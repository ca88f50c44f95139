"""Entity-level precision/recall/F1 for IOB2 tag sequences, matching the seqeval package's default mode."""

import datasets
import evaluate

_DESCRIPTION = (
    "Scores named-entity (chunk) predictions: an entity counts as correct only if its type, start and "
    "end all match a reference entity. Chunks are read the conlleval way (seqeval's default mode), so "
    "an I- tag after O or after a different type starts a new entity."
)
_CITATION = (
    "Tjong Kim Sang and De Meulder, Introduction to the CoNLL-2003 Shared Task, 2003; "
    "Nakayama, seqeval: A Python framework for sequence labeling evaluation, 2018."
)
_KWARGS = """
Args:
    predictions (list of list of str): predicted tags per sentence, e.g. [["B-PER", "I-PER", "O"]].
    references (list of list of str): ground-truth tags per sentence.
Returns:
    overall_precision, overall_recall, overall_f1 (float): micro-averaged over entities.
    overall_accuracy (float): token-level accuracy.
    <TYPE> (dict): {"precision", "recall", "f1", "number"} for each entity type seen, where number is
        the count of reference entities of that type.
"""


def _split(tag):
    # As seqeval: "B-PER" -> ("B", "PER"); "O" -> ("O", "_"). A tag with no prefix ("PER") is read as "I-PER"
    # (a run of one tag is one entity), where seqeval would read prefix "P" and type "ER".
    if tag not in ("O", ".") and tag[1:2] != "-":
        return "I", tag
    return tag[:1], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _ends(prev_tag, tag, prev_type, type_):
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _starts(prev_tag, tag, prev_type, type_):
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def get_entities(sentences):
    """Set of (type, start, end) entities over all sentences, with token offsets in their concatenation."""
    tags = [tag for sentence in sentences for tag in list(sentence) + ["O"]]
    entities, prev_tag, prev_type, begin = set(), "O", "", 0
    for i, (tag, type_) in enumerate(_split(t) for t in tags + ["O"]):
        if _ends(prev_tag, tag, prev_type, type_):
            entities.add((prev_type, begin, i - 1))
        if _starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return entities


def _prf(n_correct, n_pred, n_true):
    precision = n_correct / n_pred if n_pred else 0.0
    recall = n_correct / n_true if n_true else 0.0
    f1 = 2 * n_correct / (n_pred + n_true) if n_pred + n_true else 0.0
    return precision, recall, f1


class Seqeval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references):
        for i, (ps, ts) in enumerate(zip(predictions, references)):
            if len(ps) != len(ts):
                raise ValueError(f"sentence {i} has {len(ps)} predicted tags but {len(ts)} reference tags")
        pred, true = get_entities(predictions), get_entities(references)
        results = {}
        for type_ in sorted({e[0] for e in pred | true}):
            p = {e for e in pred if e[0] == type_}
            t = {e for e in true if e[0] == type_}
            precision, recall, f1 = _prf(len(p & t), len(p), len(t))
            results[type_] = {"precision": precision, "recall": recall, "f1": f1, "number": len(t)}
        precision, recall, f1 = _prf(len(pred & true), len(pred), len(true))
        pairs = [(p, t) for ps, ts in zip(predictions, references) for p, t in zip(ps, ts)]
        accuracy = sum(p == t for p, t in pairs) / len(pairs) if pairs else 0.0
        results.update(overall_precision=precision, overall_recall=recall, overall_f1=f1, overall_accuracy=accuracy)
        return results
