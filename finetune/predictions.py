"""Writing ``finetune predict`` results: JSON lines, CSV or TSV, with the input's other columns kept
beside the prediction, only the top-k classes when asked, and a one-line summary."""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from finetune.errors import RecipeError

FORMATS = ("jsonl", "csv", "tsv")


def output_format(requested: str | None, output: str | None) -> str:
    """``--format``, else the ``--output`` file's suffix, else JSON lines."""
    if requested:
        return requested
    suffix = Path(output).suffix.lstrip(".").lower() if output else ""
    if output and suffix not in FORMATS:
        raise RecipeError(f"--output {output}: can't tell the format from '.{suffix}'; name a .jsonl/.csv/.tsv "
                          "file or pass --format jsonl|csv|tsv")
    return suffix or "jsonl"


def check_output_file(output: str) -> None:
    """Before the model loads: the output file's folder exists and the path is not a folder."""
    path = Path(output)
    if path.is_dir():
        raise RecipeError(f"--output: {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise RecipeError(f"--output: {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise RecipeError(f"--output: no permission to write in {path.parent}")


def keep_top_k(result: dict[str, Any], k: int | None) -> dict[str, Any]:
    """Only the k most probable classes in ``probabilities`` (most probable first); a multi-label
    result keeps its ``labels`` (the decision) whole."""
    if k is None or "probabilities" not in result:
        return result
    top = sorted(result["probabilities"].items(), key=lambda item: -item[1])[:k]
    return {**result, "probabilities": dict(top)}


def render(texts: list, results: list[dict], rows: list[dict] | None, input_columns: list[str], fmt: str) -> str:
    """The whole output as text. ``rows``: each input row whole (table inputs), its other columns kept as
    they are: beside ``input`` in JSON lines, before the ``predicted_*`` columns in CSV/TSV."""
    if fmt == "jsonl":
        lines = []
        for i, (text, result) in enumerate(zip(texts, results)):
            others = {k: v for k, v in rows[i].items() if k not in input_columns} if rows else {}
            lines.append(json.dumps({"input": text, **result, **({"columns": others} if others else {})},
                                    ensure_ascii=False))
        return "".join(line + "\n" for line in lines)
    table = []
    for i, (text, result) in enumerate(zip(texts, results)):
        row = dict(rows[i]) if rows else {"input": " ".join(text) if isinstance(text, list) else text}
        if "label" in result:
            row["predicted_label"] = result["label"]
            row["predicted_probability"] = result["probabilities"][result["label"]]
            row["predicted_probabilities"] = json.dumps(result["probabilities"], ensure_ascii=False)
        elif "labels" in result:  # multi-label: the chosen labels, then every label's probability
            row["predicted_labels"] = "|".join(result["labels"])
            row["predicted_probabilities"] = json.dumps(result["probabilities"], ensure_ascii=False)
        elif "score" in result:
            row["predicted_score"] = result["score"]
        else:
            row["predicted_tags"] = " ".join(result["tags"])
        table.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]), delimiter="\t" if fmt == "tsv" else ",",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()


def summary(results: list[dict], seconds: float) -> str:
    """One line for stderr: rows, time, and the predicted label counts (rows holding each label, for multi-label)."""
    labels = Counter(r["label"] for r in results if "label" in r)
    labels.update(name for r in results for name in r.get("labels", []))
    counts = (": " + ", ".join(f"{name} {n}" for name, n in labels.most_common(10))
              + (f" (+{len(labels) - 10} more labels)" if len(labels) > 10 else "")) if labels else ""
    return f"predicted {len(results):,} rows in {seconds:.1f} s{counts}"


def write(text: str, output: str | None) -> None:
    """To the file, written whole and then moved into place (never half-written), or to stdout."""
    if output:
        from finetune.runs import (
            atomic_write_text,  # torch comes with it: not at command-line start
        )

        atomic_write_text(Path(output), text)
    else:
        print(text, end="")
