"""Data: load splits through ``datasets`` (checked by ``finetune.ingest``), check columns and labels,
tokenise, batch.

Tokenised splits are cached by ``datasets`` (keyed by data fingerprint, tokenizer and
max_length), so repeated runs don't tokenise again.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from finetune import ingest, sources
from finetune.config import DataConfig, RecipeConfig, RecipeError
from finetune.errors import DataError
from finetune.sources import EXTENSIONS, expand_path  # noqa: F401  (expand_path: re-exported)
from finetune.tasks import TASKS
from finetune.tasks.base import require_columns


def read_table(path: Path, other_formats: tuple[str, ...] = ()) -> datasets.Dataset:
    """One tsv/csv/json/jsonl/parquet file as a Dataset (e.g. inputs for ``finetune predict``), through
    the same checks as split files. ``other_formats``: suffixes the caller reads itself, named in the error."""
    fmt = EXTENSIONS.get(path.suffix)
    if fmt is None:
        raise DataError(f"{path}: expected one of {', '.join([*other_formats, *EXTENSIONS])}")
    return ingest.read_file(path, fmt)


def read_lines(path: Path) -> list[str]:
    """A .txt file's non-blank lines (one input each); invalid UTF-8 and an empty file are named errors."""
    lines = [line for line in ingest.decode(path, path.read_bytes()).splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path} has no rows (no non-blank line)")
    return lines


def _split_files(cfg: DataConfig, root: Path) -> dict[str, tuple[str, Path]]:
    """Map each logical split to (format, file) inside a local folder."""
    wanted = cfg.splits.named()  # a validation carved out of train has no file of its own
    files = {}
    for logical, stem in wanted.items():
        candidates = [root / f"{stem}{ext}" for ext in EXTENSIONS if (root / f"{stem}{ext}").is_file()]
        if not candidates:
            raise RecipeError(
                f"data.splits.{logical}: no file '{stem}' with extension {'/'.join(EXTENSIONS)} in {root}"
            )
        fmt = cfg.format if cfg.format != "auto" else EXTENSIONS[candidates[0].suffix]
        files[logical] = (fmt, candidates[0])
    return files


def _refuse_unread_splits(cfg: DataConfig, root: Path) -> None:
    """A test file in the user's folder that no role reads (e.g. a shipped recipe that scores on the hub's
    validation split, run on a folder of one's own) would be left out in silence; ``test: null`` skips it."""
    found = [root / f"test{ext}" for ext in EXTENSIONS if (root / f"test{ext}").is_file()]
    if found and cfg.splits.test is not None and "test" not in cfg.splits.named().values():
        raise DataError(f"data.splits: {found[0]} is read by no split (the recipe reads {cfg.splits.named()}); "
                        "name it (data.splits.test=test), skip it (data.splits.test=null) or move it out")


def load_splits(cfg: DataConfig, whole_folder: bool = True) -> datasets.DatasetDict:
    """Load train/validation(/test) as a DatasetDict keyed by those logical names.

    Local files go through ``finetune.ingest`` (structure, then empty texts and missing labels under the
    data.on_* policies); each split loads on its own, so a column one file lacks is not filled in from another.
    """
    source = sources.locate(cfg)  # a local folder, a mirror, this project's copy or the hub
    path = source.folder
    if whole_folder and source.copy is None and path is not None and path.is_dir():
        _refuse_unread_splits(cfg, path)
    if source.assembled:  # hub ids and carve-outs: read the source's splits, then give each role its split
        raw = sources.load_roles(source, cfg, read_folder=lambda plain: load_splits(plain, whole_folder=False))
    elif path.is_dir():
        files = _split_files(cfg, path)
        formats = {fmt for fmt, _ in files.values()}
        if len(formats) > 1:
            raise RecipeError(f"data.path: split files in {path} mix formats {sorted(formats)}")
        raw = datasets.DatasetDict({split: ingest.read_file(file, fmt, split) for split, (fmt, file) in files.items()})
    elif path.exists():
        raise RecipeError(f"data.path: {path} is a file; point it at the folder holding the split files")
    else:
        raise RecipeError(f"data.path: {path} does not exist (expected a folder with split files or a hub dataset id)")

    for split, ds in raw.items():
        if len(ds) == 0:
            raise DataError(f"data: split '{split}' ({cfg.splits.model_dump()[split]}) is empty")
    raw = ingest.check_rows(cfg, raw)
    limits = {"train": cfg.max_train_samples, "validation": cfg.max_eval_samples, "test": cfg.max_test_samples}
    for split, limit in limits.items():
        if split in raw and limit and limit < len(raw[split]):
            raw[split] = _subsample(raw[split], limit, cfg.subsample_seed)
    return raw


def _subsample(ds: datasets.Dataset, limit: int, seed: int) -> datasets.Dataset:
    """A seeded random subsample: the rows ``ds.shuffle(seed=seed).select(range(limit))`` picks, with
    the indices in hand so the subsample still knows each row's file line."""
    order = np.random.default_rng(seed).permutation(len(ds))[:limit]
    subsample = ds.select(order)
    origin = ingest.origin_of(ds)
    if origin is not None:
        ingest.remember(subsample, origin.derive(order, subsampled_from=len(ds)))
    return subsample


label_text = ingest.label_text


def label_names(recipe: RecipeConfig, raw: datasets.DatasetDict) -> list[str] | None:
    """The label set, in id order (None for regression): as given, or inferred (sorted) from the training
    split, after the task's checks of every split's labels, which name the file and line (see finetune.tasks)."""
    return TASKS[recipe.task].label_names(recipe, raw)


def tokenize(recipe: RecipeConfig, raw: datasets.DatasetDict, tokenizer, labels: list[str] | None) -> datasets.DatasetDict:
    """Tokenise every split (truncation only; padding happens per batch) and attach the task's labels."""
    cfg, task = recipe.data, TASKS[recipe.task]
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None
    if limit is not None and cfg.max_length > limit:
        raise RecipeError(f"data.max_length={cfg.max_length} exceeds the tokenizer's model_max_length of {limit} tokens "
                          "(the backbone's limit, or for a finished run the length it was trained with)")
    require_columns(raw, task.input_columns(cfg.columns) + [task.label_column(cfg.columns)])
    label_id = {name: i for i, name in enumerate(labels)} if labels else None
    out = datasets.DatasetDict()
    for split, ds in raw.items():
        out[split] = ds.map(lambda batch: task.encode(batch, tokenizer, cfg, label_id), batched=True,
                            remove_columns=ds.column_names, desc=f"tokenising {split}")
    return out


def pad_multiple(device: torch.device | str) -> int | None:
    """Round batch lengths up to a multiple of 8 on GPUs (tensor cores want it). Not on CPU: SST-2
    sentences average ~13 tokens, and rounding them up to 16 made 23 % of the computed positions
    padding (measured in scripts/bench_train.py), against 4 % for length-grouped batches without it."""
    return 8 if torch.device(device).type == "cuda" else None


def make_collator(recipe: RecipeConfig, tokenizer, multiple_of: int | None = None):
    """Pad per batch to the longest example (rounded up to ``multiple_of``), never to max_length."""
    return TASKS[recipe.task].collator(tokenizer, multiple_of)


class LengthGroupedSampler(Sampler[int]):
    """Shuffled order in which neighbouring examples have similar lengths.

    Each epoch: a seeded permutation, cut into mega-batches of ``50 * batch_size``; each
    mega-batch is sorted by length and cut into batches; the batch order is shuffled. Every
    example is seen exactly once per epoch and the order stays random, so padding drops
    without biasing training. ``group_by_length=False`` gives a plain seeded shuffle.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if not self.group:
            return iter(order)
        mega = 50 * self.batch_size
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # a short batch goes last, so the DataLoader's re-batching of this flat order keeps the groups
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        shuffled = [full[j] for j in torch.randperm(len(full), generator=generator).tolist()] + short
        return iter([i for batch in shuffled for i in batch])


def make_train_loader(recipe: RecipeConfig, train, collator, lengths: list[int] | None = None,
                      pin_memory: bool = False) -> DataLoader:
    """Length-grouped, seeded batches of the training split (``lengths`` for data without input_ids).
    ``pin_memory`` (for a CUDA device) lets the copy to the GPU overlap compute (non-blocking)."""
    lengths = lengths or [len(ids) for ids in train["input_ids"]]
    sampler = LengthGroupedSampler(lengths, recipe.train.batch_size, recipe.train.seed, recipe.train.group_by_length)
    # A private generator: creating a loader iterator must not draw from the global RNG, or a resumed
    # run (which creates its iterator at another time) would get different dropout masks.
    return DataLoader(train, batch_size=recipe.train.batch_size, sampler=sampler, collate_fn=collator,
                      generator=torch.Generator().manual_seed(recipe.train.seed), pin_memory=pin_memory)


def make_eval_loader(recipe: RecipeConfig, split: datasets.Dataset, collator, pin_memory: bool = False) -> DataLoader:
    """Evaluation batches sorted by length: the order doesn't matter for metrics, padding does."""
    lengths = [len(ids) for ids in split["input_ids"]]
    by_length = sorted(range(len(split)), key=lengths.__getitem__)
    return DataLoader(split.select(by_length), batch_size=recipe.train.eval_batch_size or 2 * recipe.train.batch_size,
                      collate_fn=collator, pin_memory=pin_memory)
