"""Training speed, side by side: Hugging Face Trainer vs a hand-written loop vs finetune recipes.

    python scripts/bench_train.py                      # 8,000 SST-2 rows, 1 epoch, 2 interleaved rounds
    python scripts/bench_train.py --rows 2000 --rounds 1 --variants trainer_grouped,ours_full   # quick look

The same fine-tune of all-MiniLM-L6-v2 (same training rows, max_length, batch size, lr, warm-up,
weight decay, clipping, epochs, seed and torch threads) with:

  trainer          transformers Trainer as its text-classification docs set it up: tokenise with
                   truncation to max_length, DataCollatorWithPadding, AutoModelForSequenceClassification
  trainer_grouped  the same with group_by_length (train_sampling_strategy="group_by_length")
  hand_loop        a minimal PyTorch loop: the same model, length-grouped batches padded per batch
  ours_full, ours_lora, ours_head   the shipped recipes sst2_minilm_{full,lora,head}; ours_head starts
                   from an empty feature cache, and its train time includes computing the features
  ours_head_nocache  sst2_minilm_head without the feature cache (train.cache_features=false)
  ours_freeze3, ours_freeze3_nocache   sst2_minilm_full with embeddings and the first 3 of 6 layers
                     frozen, with and without the feature cache (hidden states after layer 3)
  ours_full_compile  sst2_minilm_full with train.compile=true (its train time includes compiling)
  trainer_grouped_bf16, ours_full_bf16   both with bf16 autocast (Trainer's bf16=True, our
                     train.mixed_precision=bf16): another precision than the fp32 variants, compared
                     with each other only

Each variant trains in its own process (peak memory is its own); rounds alternate the order so
machine noise shows. Reported: training wall time, samples/s, real vs processed (padded) tokens,
peak RSS, test accuracy on the 872 SST-2 test sentences, and ratios of ours_full to the others
within each round. Results: benchmarks/<name>.json and .md with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FREEZE3 = ["policy.kind=freeze", "policy.freeze_embeddings=true", "policy.freeze_layers=3"]
VARIANTS = ["trainer", "trainer_grouped", "hand_loop", "ours_full", "ours_full_compile", "trainer_grouped_bf16",
            "ours_full_bf16", "ours_lora", "ours_head", "ours_head_nocache", "ours_freeze3", "ours_freeze3_nocache"]
RECIPES = {"ours_full": ("sst2_minilm_full", []), "ours_lora": ("sst2_minilm_lora", []),
           "ours_full_compile": ("sst2_minilm_full", ["train.compile=true"]),
           "ours_full_bf16": ("sst2_minilm_full", ["train.mixed_precision=bf16"]),
           "ours_freeze3": ("sst2_minilm_full", FREEZE3), "ours_freeze3_nocache": ("sst2_minilm_full",
                                                                                  FREEZE3 + ["train.cache_features=false"]),
           "ours_head": ("sst2_minilm_head", []), "ours_head_nocache": ("sst2_minilm_head", ["train.cache_features=false"])}


# --- the children ------------------------------------------------------------------------


def _shared(args):
    """The work every reference variant shares, taken from the full recipe: its settings (lr, warm-up,
    weight decay, clipping), the same training and test rows, the backbone folder and its tokenizer."""
    from transformers import AutoTokenizer

    import recipes
    from finetune import data as data_lib
    from finetune.backbones import resolve_backbone

    recipe = recipes.load("sst2_minilm_full", f"data.max_train_samples={args.rows}", f"train.epochs={args.epochs}",
                          f"train.batch_size={args.batch_size}", f"train.seed={args.seed}",
                          f"data.max_length={args.max_length}")
    raw = data_lib.load_splits(recipe.data)
    text, label = recipe.data.columns.text, recipe.data.columns.label
    rows = {split: ([str(t) for t in raw[split][text]], [int(v) for v in raw[split][label]]) for split in ("train", "test")}
    path = resolve_backbone(recipe.backbone)
    return recipe.train, rows, path, AutoTokenizer.from_pretrained(path)


def _trainer(args, grouped: bool, bf16: bool = False) -> dict:
    """transformers' text-classification docs: map(tokenize, truncation), DataCollatorWithPadding, Trainer."""
    import datasets
    import numpy as np
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    train, rows, path, tokenizer = _shared(args)
    data = datasets.DatasetDict({split: datasets.Dataset.from_dict({"text": t, "label": y})
                                 for split, (t, y) in rows.items()})
    data = data.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=args.max_length), batched=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    collator = CountingCollator(DataCollatorWithPadding(tokenizer))
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
            learning_rate=train.lr, num_train_epochs=args.epochs, weight_decay=train.weight_decay,
            warmup_steps=train.warmup_ratio, max_grad_norm=train.max_grad_norm, lr_scheduler_type="linear",
            eval_strategy="no", save_strategy="no", report_to=[], seed=args.seed, logging_steps=50, use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True, bf16=bf16,
            train_sampling_strategy="group_by_length" if grouped else "random")
        trainer = Trainer(model=model, args=training_args, train_dataset=data["train"], data_collator=collator,
                          processing_class=tokenizer)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        train_tokens = collator.take()
        predicted = trainer.predict(data["test"].remove_columns(["text"]))
    # score against the labels predict() returns: it may reorder the test set
    accuracy = float(np.mean(predicted.predictions.argmax(-1) == predicted.label_ids))
    return {"train_seconds": seconds, "samples": len(rows["train"][0]) * args.epochs, **train_tokens,
            "test_accuracy": accuracy}


class CountingCollator:
    """Wraps a collator and counts real and padded token positions of the batches it builds."""

    def __init__(self, inner):
        self.inner, self.real, self.processed = inner, 0, 0

    def __call__(self, features):
        batch = self.inner(features)
        self.real += int(batch["attention_mask"].sum())
        self.processed += batch["input_ids"].numel()
        return batch

    def take(self) -> dict:
        counts = {"tokens_real": self.real, "tokens_processed": self.processed}
        self.real = self.processed = 0
        return counts


def _hand_loop(args) -> dict:
    """The near-overhead-free reference: the same model as Trainer's, length-grouped batches padded per batch."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        get_scheduler,
    )

    from finetune.data import LengthGroupedSampler, pad_multiple

    train_cfg, rows, path, tokenizer = _shared(args)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    def encode(split):
        texts, labels = rows[split]
        encoded = tokenizer(texts, truncation=True, max_length=args.max_length)
        return [{"input_ids": ids, "attention_mask": mask, "labels": y}
                for ids, mask, y in zip(encoded["input_ids"], encoded["attention_mask"], labels)]

    train, test = encode("train"), encode("test")
    collator = CountingCollator(DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_multiple(model.device)))
    sampler = LengthGroupedSampler([len(f["input_ids"]) for f in train], args.batch_size, args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, collate_fn=collator)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train_cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=train_cfg.lr)
    steps = args.epochs * len(loader)
    scheduler = get_scheduler("linear", optimizer, int(train_cfg.warmup_ratio * steps), steps)
    model.train()
    started = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    train_tokens = collator.take()
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in DataLoader(test, batch_size=64, collate_fn=collator):
            correct += int((model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)
                            == batch["labels"]).sum())
    return {"train_seconds": seconds, "samples": len(train) * args.epochs, **train_tokens,
            "test_accuracy": correct / len(test)}


def _ours(args, variant: str, out_dir: Path) -> dict:
    import recipes

    name, extra = RECIPES[variant]
    recipe = recipes.load(name, f"data.max_train_samples={args.rows}", f"train.epochs={args.epochs}",
                          f"train.batch_size={args.batch_size}", f"train.seed={args.seed}",
                          f"data.max_length={args.max_length}", "train.eval_every=epoch",
                          f"data.max_eval_samples={args.eval_rows}", f"output.dir={out_dir}", *extra)
    with tempfile.TemporaryDirectory() as cache:  # an empty feature cache: its cost is part of the run
        os.environ["FINETUNE_CACHE"] = cache
        result = recipe.run(overwrite=True)
    m = result.metrics
    samples = m["train_seconds"] * m["samples_per_second"]
    # with the feature cache, head training reads vectors; the tokens are those the cache was computed from
    tokens = (m["tokens_real"], m["tokens_processed"]) if m["tokens_processed"] else (None, None)
    return {"train_seconds": m["train_seconds"] + m["feature_cache_seconds"], "samples": samples,
            "epoch_seconds_after_first": m["train_seconds"] / args.epochs,
            "feature_cache_seconds": m["feature_cache_seconds"], "tokens_real": tokens[0],
            "tokens_processed": tokens[1], "test_accuracy": m["test"]["accuracy"], "lr": recipe.train.lr}


def run_child(variant: str, args, out: Path) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if variant == "trainer":
        result = _trainer(args, grouped=False)
    elif variant == "trainer_grouped":
        result = _trainer(args, grouped=True)
    elif variant == "trainer_grouped_bf16":
        result = _trainer(args, grouped=True, bf16=True)
    elif variant == "hand_loop":
        result = _hand_loop(args)
    else:
        result = _ours(args, variant, Path(args.runs_dir) / variant)
    counted = result["tokens_processed"] is not None
    result.update(variant=variant, threads=torch.get_num_threads(),
                  samples_per_second=result["samples"] / result["train_seconds"],
                  padding_fraction=1 - result["tokens_real"] / result["tokens_processed"] if counted else None,
                  peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    out.write_text(json.dumps(result, indent=2))


# --- the parent ------------------------------------------------------------------------------


def machine(threads: int) -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": threads,
            "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def markdown(results: list[dict], info: dict, command: str, args) -> str:
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    title = (f"# Training speed: all-MiniLM-L6-v2 on {args.rows:,} SST-2 rows, {args.epochs} epoch(s), batch "
             f"{args.batch_size}, max_length {args.max_length}")
    where = (f"Machine: {info['cores']} CPU cores ({info['cpu']}), {info['gpu'] or 'no GPU'}, torch {info['torch']} "
             f"with {info['torch_threads']} threads, Python {info['python']}")
    lines = [title, "", f"Command: `{command}` ({info['date']})  ", where, "",
             "Median over rounds (each round runs every variant once, in alternating order; all rounds in the JSON).",
             "", "| variant | samples/s | train time | padding | real / processed tokens | peak RSS | test acc |",
             "|---|---|---|---|---|---|---|"]
    for variant, runs in by_variant.items():
        rate = statistics.median(r["samples_per_second"] for r in runs)
        counted = runs[0]["tokens_processed"] is not None
        padding = f"{100 * statistics.median(r['padding_fraction'] for r in runs):.0f} %" if counted else "-"
        tokens = f"{runs[0]['tokens_real']:,} / {runs[0]['tokens_processed']:,}" if counted else "cached vectors"
        lines.append(f"| {variant} | {rate:.1f} | {statistics.median(r['train_seconds'] for r in runs):.0f} s | "
                     f"{padding} | {tokens} | "
                     f"{statistics.median(r['peak_rss_mb'] for r in runs):,.0f} MB | "
                     f"{100 * statistics.median(r['test_accuracy'] for r in runs):.2f} % |")
    pairs = {"ours_full": ("trainer", "trainer_grouped", "hand_loop"),
             "ours_full_compile": ("trainer", "trainer_grouped", "hand_loop"),
             "ours_full_bf16": ("trainer_grouped_bf16",)}
    for ours in [v for v in pairs if v in by_variant]:
        lines += ["", f"Speed ratio of {ours} to each reference, per round (same round = same machine state):", "",
                  "| reference | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " |",
                  "|---|" + "---|" * args.rounds]
        for reference in pairs[ours]:
            if reference not in by_variant:
                continue
            ratios = [o["samples_per_second"] / r["samples_per_second"]
                      for o, r in zip(by_variant[ours], by_variant[reference])]
            lines.append(f"| {reference} | " + " | ".join(f"{x:.2f}x" for x in ratios) + " |")
    for cached_variant, what in [("ours_head", "head only"), ("ours_freeze3", "embeddings + 3 of 6 layers frozen")]:
        if cached_variant not in by_variant or f"{cached_variant}_nocache" not in by_variant:
            continue
        cached = statistics.median(r["epoch_seconds_after_first"] for r in by_variant[cached_variant])
        plain = statistics.median(r["epoch_seconds_after_first"] for r in by_variant[f"{cached_variant}_nocache"])
        first = statistics.median(r["feature_cache_seconds"] for r in by_variant[cached_variant])
        lines += ["", (f"Feature cache ({what}): computing the features took {first:.1f} s (once per data set and "
                  f"backbone); an epoch then took {cached:.2f} s against {plain:.1f} s without the cache: "
                  f"{plain / cached:.1f}x faster per epoch after the first.")]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8000, help="SST-2 training rows")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--eval-rows", type=int, default=500, help="validation rows our recipes select the best with")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--name", default="train_speed")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks"))
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "bench_train"))
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.child:
        run_child(args.child[0], args, Path(args.child[1]))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    command = "python scripts/bench_train.py " + " ".join(sys.argv[1:])
    info = machine(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    forwarded = [f"--rows={args.rows}", f"--epochs={args.epochs}", f"--batch-size={args.batch_size}",
                 f"--max-length={args.max_length}", f"--seed={args.seed}", f"--threads={args.threads}",
                 f"--eval-rows={args.eval_rows}", f"--runs-dir={args.runs_dir}"]
    for round_index in range(args.rounds):
        order = variants if round_index % 2 == 0 else variants[::-1]
        for variant in order:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
                out = Path(handle.name)
            print(f"== round {round_index + 1}: {variant}", flush=True)
            subprocess.run([sys.executable, __file__, "--child", variant, str(out), *forwarded], check=True)
            result = {**json.loads(out.read_text()), "round": round_index + 1}
            out.unlink()
            results.append(result)
            print(json.dumps(result), flush=True)
            # written after every run, so an interrupted benchmark keeps what it measured
            (out_dir / f"{args.name}.json").write_text(json.dumps({"command": command, "machine": info,
                                                                    "results": results}, indent=2))
    results.sort(key=lambda r: (variants.index(r["variant"]), r["round"]))
    table = markdown(results, info, command, args)
    (out_dir / f"{args.name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
