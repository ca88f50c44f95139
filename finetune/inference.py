"""What a model costs to keep and to run: parameters, size on disk, CPU latency.

Used by ``finetune prune`` for its before/after report, and usable on any model, e.g. for an
accuracy-versus-latency plot over a sweep's trials:

    from finetune.inference import latency_ms, parameter_counts, weights_size_bytes
    run = load_run("runs/x")
    latency_ms(run.model, run.tokenizer, texts, batch_size=32, max_length=64)
"""

from __future__ import annotations

import statistics
import time
import zlib
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters and how many of them are not exactly zero (magnitude pruning zeroes
    weights but keeps the tensors dense, so only the second number moves)."""
    params = list(model.parameters())
    return {"total": sum(p.numel() for p in params),
            "nonzero": sum(int(torch.count_nonzero(p.detach())) for p in params)}


def _batches(texts: list, pairs: list | None, batch_size: int, count: int) -> list[tuple[list, list | None]]:
    """``count`` batches of consecutive inputs, wrapping around: the same inputs for every model measured."""
    batches = []
    for b in range(count):
        index = [(b * batch_size + i) % len(texts) for i in range(batch_size)]
        batches.append(([texts[i] for i in index], [pairs[i] for i in index] if pairs else None))
    return batches


def latency_ms(model: torch.nn.Module, tokenizer, texts: list, batch_size: int, max_length: int, repeats: int = 20,
               warmup: int = 3, pairs: list | None = None, words: bool | None = None) -> float:
    """Median wall time of one forward pass over a batch, in milliseconds.

    Runs in eval mode under ``torch.inference_mode`` on the model's current device, after
    ``warmup`` untimed batches. Each timed batch holds different real inputs (``texts``: strings,
    or word lists for token classification, ``words=True``, guessed from the first input when None;
    ``pairs``: second texts of pairs), padded to its
    longest input as at prediction time. Tokenisation is done beforehand and not timed.
    The median, not the mean, so a stray scheduler hiccup on a shared machine doesn't count.

    Raises:
        ValueError: no texts, or a batch size or repeat count below 1.
    """
    if not texts or batch_size < 1 or repeats < 1:
        raise ValueError(f"latency_ms needs texts, batch_size >= 1 and repeats >= 1 "
                         f"(got {len(texts)} texts, batch_size={batch_size}, repeats={repeats})")
    device = next(model.parameters()).device
    words = isinstance(texts[0], (list, tuple)) if words is None else words
    encoded = [tokenizer(chunk, pair_chunk, truncation=True, max_length=max_length, padding=True,
                         return_tensors="pt", is_split_into_words=words).to(device)
               for chunk, pair_chunk in _batches(texts, pairs, batch_size, warmup + repeats)]
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for i, batch in enumerate(encoded):
                started = time.perf_counter()
                model(**batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - started)
    finally:
        model.train(was_training)
    return 1000 * statistics.median(times)


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a saved model or run folder: its own, plus ``base/`` for an adapter
    (lora, dora, ia3: useless without it). Checkpoints and ``merged/`` are not counted."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if (folder / "adapter_config.json").is_file() and (folder / "base").is_dir():
        files += weight_files(folder / "base")
    return files


def weights_size_bytes(folder: str | Path) -> int:
    """Bytes on disk of the folder's weight files (see ``weight_files``)."""
    return sum(p.stat().st_size for p in weight_files(folder))


def compressed_size_bytes(folder: str | Path, level: int = 1) -> int:
    """Bytes the weight files take after zlib compression. Dense safetensors of a magnitude-pruned
    model are as large as the unpruned ones; compressed, their zeros show."""
    total = 0
    for path in weight_files(folder):
        compressor = zlib.compressobj(level)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(compressor.compress(chunk))
        total += len(compressor.flush())
    return total
