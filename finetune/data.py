"""Data: load splits through ``datasets``, check columns and labels, tokenise, batch.

Tokenised splits are cached by ``datasets`` (keyed by data fingerprint, tokenizer and
max_length), so repeated runs don't tokenise again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

from finetune.config import DataConfig, Recipe, RecipeError

EXTENSIONS = {".tsv": "tsv", ".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def expand_path(path: str) -> str:
    """Expand ``${FINETUNE_DATA_DIR}`` (default ../shared/data beside the repo), other $VARS and ~."""
    data_dir = os.environ.get("FINETUNE_DATA_DIR", str(DEFAULT_DATA_DIR))
    path = path.replace("${FINETUNE_DATA_DIR}", data_dir).replace("$FINETUNE_DATA_DIR", data_dir)
    return os.path.expanduser(os.path.expandvars(path))


BUILDERS = {  # file format -> datasets builder and its options (TSV/CSV: keep "NA"/"null" as text)
    "tsv": ("csv", {"delimiter": "\t", "keep_default_na": False}),
    "csv": ("csv", {"keep_default_na": False}),
    "json": ("json", {}), "jsonl": ("json", {}), "parquet": ("parquet", {}),
}


def read_table(path: Path) -> datasets.Dataset:
    """One tsv/csv/json/jsonl/parquet file as a Dataset (e.g. inputs for ``finetune predict``)."""
    fmt = EXTENSIONS.get(path.suffix)
    if fmt is None:
        raise RecipeError(f"{path}: expected one of {', '.join(EXTENSIONS)}")
    builder, kwargs = BUILDERS[fmt]
    return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)


def _split_files(cfg: DataConfig, root: Path) -> dict[str, tuple[str, Path]]:
    """Map each logical split to (format, file) inside a local folder."""
    wanted = {"train": cfg.splits.train, "validation": cfg.splits.validation}
    if cfg.splits.test:
        wanted["test"] = cfg.splits.test
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


def _has_no_rows(file: Path, fmt: str) -> bool:
    """True for an empty file or a csv/tsv with only a header (``datasets`` fails on those obscurely)."""
    if fmt == "parquet":
        return False
    with open(file, encoding="utf-8", errors="replace") as f:
        lines = (line for line in f if line.strip())
        needed = 2 if fmt in ("csv", "tsv") else 1
        return sum(1 for _, _ in zip(range(needed), lines)) < needed


def load_splits(cfg: DataConfig) -> datasets.DatasetDict:
    """Load train/validation(/test) as a DatasetDict keyed by those logical names."""
    path = Path(expand_path(cfg.path))
    if path.is_dir():
        files = _split_files(cfg, path)
        formats = {fmt for fmt, _ in files.values()}
        if len(formats) > 1:
            raise RecipeError(f"data.path: split files in {path} mix formats {sorted(formats)}")
        fmt = formats.pop()
        for split, (_, file) in files.items():
            if _has_no_rows(file, fmt):
                raise RecipeError(f"data: split '{split}' ({file}) is empty")
        data_files = {name: str(file) for name, (_, file) in files.items()}
        builder, kwargs = BUILDERS[fmt]
        raw = datasets.load_dataset(builder, data_files=data_files, **kwargs)
    elif path.exists():
        raise RecipeError(f"data.path: {path} is a file; point it at the folder holding the split files")
    elif re.fullmatch(r"[\w.-]+(/[\w.-]+)?", cfg.path):
        try:
            hub = datasets.load_dataset(cfg.path, cfg.name, revision=cfg.revision)
        except Exception as err:
            raise RecipeError(f"data.path: '{cfg.path}' is not a local folder and could not be loaded from the hub: {err}") from None
        names = {"train": cfg.splits.train, "validation": cfg.splits.validation, "test": cfg.splits.test}
        missing = [s for s in names.values() if s and s not in hub]
        if missing:
            raise RecipeError(f"data.splits: hub dataset {cfg.path} has splits {list(hub)}, not {missing}")
        raw = datasets.DatasetDict({k: hub[v] for k, v in names.items() if v})
    else:
        raise RecipeError(f"data.path: {path} does not exist (expected a folder with split files or a hub dataset id)")

    for split, ds in raw.items():
        if len(ds) == 0:
            raise RecipeError(f"data: split '{split}' ({cfg.splits.model_dump()[split]}) is empty")
    limits = {"train": cfg.max_train_samples, "validation": cfg.max_eval_samples, "test": cfg.max_test_samples}
    for split, limit in limits.items():
        if split in raw and limit and limit < len(raw[split]):
            raw[split] = raw[split].shuffle(seed=cfg.subsample_seed).select(range(limit))
    return raw


def _require_columns(raw: datasets.DatasetDict, columns: list[str]) -> None:
    for split, ds in raw.items():
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise RecipeError(
                f"data.columns: split '{split}' has no column {missing[0]!r}; its columns are {ds.column_names} "
                "(map yours with data.columns.text / text_pair / label / tokens / tags)"
            )


def _natural_key(value: str):
    return (0, int(value), "") if re.fullmatch(r"-?\d+", value) else (1, 0, value)


def label_names(recipe: Recipe, raw: datasets.DatasetDict) -> list[str] | None:
    """The label set, in id order: as given, or inferred (sorted) from the training split.

    Raises:
        RecipeError: a label in any split is not in the set.
    """
    cols = recipe.data.columns
    column = cols.tags if recipe.task == "token_classification" else cols.label
    _require_columns(raw, [column])
    if recipe.task == "regression":
        for split, ds in raw.items():
            for row, value in enumerate(ds[column]):
                try:
                    float(value)
                except (TypeError, ValueError):
                    raise RecipeError(f"data: split '{split}' row {row + 1} column '{column}' has {value!r}, "
                                      "not a number (task=regression)") from None
        return None

    def values(ds):
        vals = ds[column]
        return {str(t) for seq in vals for t in seq} if recipe.task == "token_classification" else {str(v) for v in vals}

    names = recipe.data.labels or sorted(values(raw["train"]), key=_natural_key)
    if len(names) < 2:
        raise RecipeError(f"data: found {len(names)} label(s) {names}; classification needs at least 2")
    known = set(names)
    for split, ds in raw.items():
        unknown = sorted(values(ds) - known, key=_natural_key)
        if unknown:
            raise RecipeError(
                f"data: split '{split}' column '{column}' has label {unknown[0]!r} not in the label set {names}"
                + (" (data.labels)" if recipe.data.labels else " (inferred from the training split)")
            )
    return names


def tokenize(recipe: Recipe, raw: datasets.DatasetDict, tokenizer, labels: list[str] | None) -> datasets.DatasetDict:
    """Tokenise every split (truncation only; padding happens per batch) and attach integer labels."""
    cfg = recipe.data
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None
    if limit is not None and cfg.max_length > limit:
        raise RecipeError(f"data.max_length={cfg.max_length} exceeds the backbone's limit of {limit} tokens")
    cols = cfg.columns
    if recipe.task == "token_classification":
        _require_columns(raw, [cols.tokens, cols.tags])
        if not tokenizer.is_fast:
            raise RecipeError("token_classification needs a fast tokenizer (word_ids) for label alignment")
        label_id = {name: i for i, name in enumerate(labels)}

        def encode(batch):
            enc = tokenizer(batch[cols.tokens], is_split_into_words=True, truncation=True, max_length=cfg.max_length)
            enc["labels"] = []
            for i, tags in enumerate(batch[cols.tags]):
                previous, aligned = None, []
                for word in enc.word_ids(i):  # label the first sub-word of each word only
                    aligned.append(-100 if word is None or word == previous else label_id[str(tags[word])])
                    previous = word
                enc["labels"].append(aligned)
            return enc
    else:
        _require_columns(raw, [cols.text, cols.label] + ([cols.text_pair] if cols.text_pair else []))
        label_id = {name: i for i, name in enumerate(labels)} if labels else None

        def encode(batch):
            pair = batch[cols.text_pair] if cols.text_pair else None
            enc = tokenizer(batch[cols.text], pair, truncation=True, max_length=cfg.max_length)
            if label_id is None:
                enc["labels"] = [float(v) for v in batch[cols.label]]
            else:
                enc["labels"] = [label_id[str(v)] for v in batch[cols.label]]
            return enc

    out = datasets.DatasetDict()
    for split, ds in raw.items():
        out[split] = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenising {split}")
    return out


def pad_multiple(device: torch.device | str) -> int | None:
    """Round batch lengths up to a multiple of 8 on GPUs (tensor cores want it). Not on CPU: SST-2
    sentences average ~13 tokens, and rounding them up to 16 made 23 % of the computed positions
    padding (measured in scripts/bench_train.py), against 4 % for length-grouped batches without it."""
    return 8 if torch.device(device).type == "cuda" else None


def make_collator(recipe: Recipe, tokenizer, multiple_of: int | None = None):
    """Pad per batch to the longest example (rounded up to ``multiple_of``), never to max_length."""
    if recipe.task == "token_classification":
        return DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=multiple_of)
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple_of)


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


def make_train_loader(recipe: Recipe, train, collator, lengths: list[int] | None = None,
                      pin_memory: bool = False) -> DataLoader:
    """Length-grouped, seeded batches of the training split (``lengths`` for data without input_ids).
    ``pin_memory`` (for a CUDA device) lets the copy to the GPU overlap compute (non-blocking)."""
    lengths = lengths or [len(ids) for ids in train["input_ids"]]
    sampler = LengthGroupedSampler(lengths, recipe.train.batch_size, recipe.train.seed, recipe.train.group_by_length)
    # A private generator: creating a loader iterator must not draw from the global RNG, or a resumed
    # run (which creates its iterator at another time) would get different dropout masks.
    return DataLoader(train, batch_size=recipe.train.batch_size, sampler=sampler, collate_fn=collator,
                      generator=torch.Generator().manual_seed(recipe.train.seed), pin_memory=pin_memory)


def make_eval_loader(recipe: Recipe, split: datasets.Dataset, collator, pin_memory: bool = False) -> DataLoader:
    """Evaluation batches sorted by length: the order doesn't matter for metrics, padding does."""
    lengths = [len(ids) for ids in split["input_ids"]]
    by_length = sorted(range(len(split)), key=lengths.__getitem__)
    return DataLoader(split.select(by_length), batch_size=recipe.train.eval_batch_size or 2 * recipe.train.batch_size,
                      collate_fn=collator, pin_memory=pin_memory)
