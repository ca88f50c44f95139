"""What an export writes besides the model: the example batch the exporters trace, the versions, the check's
summary lines and the folder's README.md."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from finetune.config import RecipeError
from finetune.durable import atomic_write_text


def example_batch(tokenizer, rows, max_length: int, words: bool) -> dict:
    """A few real rows of the split, tokenised and padded: at least 2 rows and never as many rows as tokens
    (torch.export would take a dimension of size 1, or two equal ones, for fixed or tied)."""
    if not rows.texts:
        raise RecipeError(f"export: the {rows.split} split has no rows to trace and check the export with")
    count = 8
    while True:
        index = [i % len(rows.texts) for i in range(max(2, min(count, len(rows.texts))))]
        enc = tokenizer([rows.texts[i] for i in index], [rows.pairs[i] for i in index] if rows.pairs else None,
                        truncation=True, max_length=max_length, padding=True, return_tensors="pt",
                        is_split_into_words=words)
        batch, sequence = enc["input_ids"].shape
        if batch != sequence or batch <= 2:
            return dict(enc)
        count = batch - 1


def versions(fmt: str) -> dict[str, str]:
    """The versions that wrote the export (and that read it back for the check)."""
    names = ["finetune", "torch", "transformers", "tokenizers"] + (["onnx", "onnxscript", "onnxruntime"]
                                                                   if fmt == "onnx" else [])
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def describe_check(meta: dict) -> list[str]:
    """The check (``meta["check"]``) in a few lines, for the console, export.json and README.md."""
    check = meta["check"]
    rows = f"{check['rows']} rows" + (f", the first of {check['rows_in_split']}"
                                      if check["rows"] < check["rows_in_split"] else "")
    if check["decisions"] is None:
        agreement = "no decisions to compare (regression)"
    else:
        agreement = (f"predictions agree on {check['agreeing']}/{check['decisions']} {check['unit']} "
                     f"({check['agreement']:.2%})")
    scores = (f"{check['metric']} {check['reference_score']:.4f} (PyTorch float32) vs {check['exported_score']:.4f} "
              "(exported)")
    lines = [f"note: {check['note']}"] if check.get("note") else []
    if not meta["quantization"]:
        lines.append(f"checked against the run's PyTorch model on the {check['split']} split ({rows}): max |logit "
                     f"difference| {check['max_abs_diff']:.2g} (allowed {check['tolerance']:g}), {agreement}; {scores}")
        return lines
    lines.append(f"int8 vs the run's float32 PyTorch model on the {check['split']} split ({rows}): {agreement}; "
                 f"{scores}; max |logit difference| {check['max_abs_diff']:.3g} (quantization changes the numbers: "
                 "reported, never refused)")
    mechanics = check.get("int8_mechanics")
    if mechanics:
        what = "its float32 graph" if meta["format"] == "onnx" else "the PyTorch int8 model it stores"
        lines.append(f"the export itself checked exactly against {what} on {mechanics['rows']} rows: max |logit "
                     f"difference| {mechanics['max_abs_diff']:.2g}")
    return lines


USAGE = {
    "onnx": """```python
import json, numpy as np, onnxruntime
from transformers import AutoTokenizer
meta = json.load(open("export.json"))
tokenizer = AutoTokenizer.from_pretrained(".")
session = onnxruntime.InferenceSession("model.onnx")
enc = tokenizer(["a sentence"], truncation=True, max_length=meta["max_length"], padding=True, return_tensors="np")
logits = session.run(["logits"], {name: enc[name] for name in meta["inputs"]})[0]
```""",
    "torchscript": """```python
import json, torch
from transformers import AutoTokenizer
meta = json.load(open("export.json"))
tokenizer = AutoTokenizer.from_pretrained(".")
model = torch.jit.load("model.pt")
enc = tokenizer(["a sentence"], truncation=True, max_length=meta["max_length"], padding=True, return_tensors="pt")
logits = model(*(enc[name] for name in meta["inputs"]))
```""",
    "safetensors-int8": """```python
import modeling_finetune, int8_linear   # this folder's files
model = int8_linear.load_int8(".", modeling_finetune.FinetuneForSequenceClassification)  # or ...ForTokenClassification
```
(`export.json`'s `architecture` names the class.)""",
}

DEPRECATED = ("\nThis format relies on PyTorch APIs that PyTorch has deprecated (`torch.jit`, `torch.ao.quantization`);"
              " the ONNX export is the durable one.\n")


def write_readme(folder: Path, meta: dict, summary: list[str], run_dir: Path, name: str) -> None:
    """README.md of the exported folder ``folder``, to be moved to ``name``."""
    kind = meta["format"] + (" (dynamic int8)" if meta["quantization"] else "")
    checked = "\n".join(f"- {line}" for line in summary)
    labels = ", ".join(meta["labels"]) if meta["labels"] else "none (a score)"
    text = f"""# {meta['recipe']['name']}: {kind} export

The whole model of the finetune run `{run_dir}` (backbone + {meta['pooling']} pooling + {meta['head']} head{
        ', adapter merged' if meta['source']['adapter_merged'] else ''}), exported with {meta['exporter']}.
Task: {meta['task']}; labels: {labels}; inputs {', '.join(meta['inputs'])} cut at {meta['max_length']} tokens.

## Check

{checked}

## Use

    finetune predict --model {name} --input FILE    # the same output as on the run
    python {name}/predict.py "a sentence"           # without finetune (numpy, tokenizers + the runtime)

{USAGE[meta['format']]}
{DEPRECATED if meta['format'] != 'onnx' else ''}
`export.json` holds the labels, thresholds, temperature and inputs, the check in full and the versions used.
"""
    atomic_write_text(folder / "README.md", text)
