"""Predict with this exported model, without finetune installed (``finetune export`` copies this file into
every exported folder as ``predict.py``).

    python predict.py "a gripping film" "a dull plot"       # one JSON line per input: label, probabilities
    python predict.py "first text" --pair "second text"     # a text-pair model
    python predict.py "Paris is lovely"                     # token classification: words split at spaces
    some_command | python predict.py                        # one input per line on stdin

Needs numpy and tokenizers, plus onnxruntime (onnx), torch (torchscript), or torch and transformers
(safetensors-int8, rebuilt with this folder's modeling_finetune.py and int8_linear.py). The output is what
``finetune predict --model THIS_FOLDER`` prints for the same inputs, up to float rounding.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def load_tokenizer(meta: dict):
    """tokenizer.json with the run's truncation (longest first for pairs, as transformers' truncation=True)
    and padding to the longest input of a batch."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(HERE / "tokenizer.json"))
    settings = meta["tokenizer"]
    tokenizer.enable_truncation(meta["max_length"])
    tokenizer.enable_padding(pad_id=settings["pad_token_id"], pad_token=settings["pad_token"],
                             direction=settings.get("padding_side", "right"))
    return tokenizer


def load_model(meta: dict):
    """The exported model as a function: {input name: int64 array (B, T)} -> float32 logits."""
    file = str(HERE / meta["model_file"])
    if meta["format"] == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(file, providers=["CPUExecutionProvider"])
        return lambda arrays: session.run(["logits"], arrays)[0]
    import torch

    if meta["format"] == "torchscript":
        module = torch.jit.load(file, map_location="cpu").eval()
        model = lambda arrays: module(*(torch.from_numpy(arrays[name]) for name in meta["inputs"]))
    else:
        sys.path.insert(0, str(HERE))
        import int8_linear
        import modeling_finetune

        rebuilt = int8_linear.load_int8(HERE, getattr(modeling_finetune, meta["architecture"]), meta["model_file"])
        model = lambda arrays: rebuilt(**{name: torch.from_numpy(a) for name, a in arrays.items()}).logits

    def run(arrays: dict) -> np.ndarray:
        with torch.inference_mode():
            return model(arrays).float().numpy()

    return run


def predict(meta: dict, tokenizer, model, texts: list, pairs: list | None = None) -> list[dict]:
    task, labels = meta["task"], meta["labels"]
    words = task == "token_classification"
    if words:
        texts = [text.split() for text in texts]
    encodings = tokenizer.encode_batch(list(zip(texts, pairs)) if pairs else texts, is_pretokenized=words)
    arrays = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
              "token_type_ids": [e.type_ids for e in encodings]}
    logits = model({name: np.asarray(arrays[name], dtype=np.int64) for name in meta["inputs"]}).astype(np.float64)
    results = []
    for i, row in enumerate(logits):
        if task == "regression":
            results.append({"score": float(row[0])})
        elif task == "multi_label_classification":
            probs = 1 / (1 + np.exp(-row))
            order = sorted(range(len(labels)), key=lambda j: -probs[j])
            results.append({"labels": [labels[j] for j in order if probs[j] > meta["thresholds"][j]],
                            "probabilities": {labels[j]: round(float(probs[j]), 6) for j in order}})
        elif words:  # one tag per word, at its first sub-word
            tags, previous = [], None
            for position, word in enumerate(encodings[i].word_ids):
                if word is not None and word != previous:
                    tags.append(labels[int(row[position].argmax())])
                previous = word
            results.append({"tokens": texts[i][:len(tags)], "tags": tags})
        else:
            row = row / (meta.get("temperature") or 1.0)
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            results.append({"label": labels[int(probs.argmax())],
                            "probabilities": {name: round(float(p), 6) for name, p in zip(labels, probs)}})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("texts", nargs="*", help="inputs (default: one per line on stdin)")
    parser.add_argument("--pair", action="append", default=None, help="second text of a pair, once per input")
    args = parser.parse_args(argv)
    meta = json.loads((HERE / "export.json").read_text())
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if bool(args.pair) != meta["text_pair"] or (args.pair and len(args.pair) != len(texts)):
        parser.error("this model reads text pairs: give one --pair per input" if meta["text_pair"]
                     else "this model reads single texts: --pair does not apply")
    tokenizer, model = load_tokenizer(meta), load_model(meta)
    for start in range(0, len(texts), 64):
        chunk, pairs = texts[start:start + 64], args.pair[start:start + 64] if args.pair else None
        for text, result in zip(chunk, predict(meta, tokenizer, model, chunk, pairs)):
            shown = text.split() if meta["task"] == "token_classification" else text  # as finetune predict shows it
            print(json.dumps({"input": shown, **result}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
