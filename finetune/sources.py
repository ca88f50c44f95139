"""Find a data set (local folder, mirror, this project's copy or the hub) and give each recipe role its split.

``data.path`` is resolved like ``backbone.name``:
  1. an existing local folder (``${FINETUNE_DATA_DIR}``, other $VARS and ~ expand);
  2. a mirror: the ``$FINETUNE_MIRRORS`` file that backbones use maps the id (``id:name`` with ``data.name``)
     to a folder of ``<split>.tsv/csv/json/jsonl/parquet`` files, a ``save_to_disk`` folder or a download
     of the hub repository;
  3. this project's copies of the shipped recipes' data sets under ``${FINETUNE_DATA_DIR}`` (``COPIES``);
  4. the hub through ``datasets`` (offline, only what its cache holds).
Mirrors and copies are skipped when ``data.revision`` pins a revision, since they have none.

Hub data and the copies standing in for it look alike: class-label columns hold class names, and a copy's
columns and splits are presented under the hub's names. Then each role (train/validation/test) gets the
split ``data.splits`` names, and ``data.splits.validation_from_train`` carves validation out of train.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
from huggingface_hub import constants

from finetune import ingest
from finetune.backbones import user_mirrors
from finetune.config import DataConfig, SplitsConfig
from finetune.errors import DataError

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
ROLES = ("train", "validation", "test")


EXTENSIONS = {".tsv": "tsv", ".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def expand_path(path: str) -> str:
    """Expand ``${FINETUNE_DATA_DIR}`` (default ../shared/data beside the repo), other $VARS and ~."""
    data_dir = os.environ.get("FINETUNE_DATA_DIR", str(DEFAULT_DATA_DIR))
    path = path.replace("${FINETUNE_DATA_DIR}", data_dir).replace("$FINETUNE_DATA_DIR", data_dir)
    return os.path.expanduser(os.path.expandvars(path))


@dataclass(frozen=True)
class Copy:
    """A local copy of a hub data set, shown under the hub's split and column names."""

    folder: str
    """Folder under ${FINETUNE_DATA_DIR}."""
    splits: dict[str, tuple[str, ...]]
    """Hub split -> the copy's file stems that hold its rows (concatenated in this order)."""
    renames: dict[str, str] = field(default_factory=dict)
    """The copy's column -> the hub's column."""
    class_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Integer label column -> the hub's class names (id order)."""


# hub (id, configuration) -> this project's copy; see each folder's README for where its rows come from
COPIES: dict[tuple[str, str | None], Copy] = {
    # train.tsv + validation.tsv = GLUE's SST-2 train (the ALPS authors' 90/10 split); test.tsv = GLUE's dev
    # set, the hub's labeled "validation". The hub's test split is unlabeled, so the copy has none.
    ("stanfordnlp/sst2", None): Copy("sst2", {"train": ("train", "validation"), "validation": ("test",)},
                                     class_names={"label": ("negative", "positive")}),
    # 9,980 rows of the hub's 120,000 training rows, and its whole test split
    ("fancyzhx/ag_news", None): Copy("agnews", {"train": ("train", "validation"), "test": ("test",)}),
    # the hub's train without 81 duplicate or test-overlapping questions, and its whole test split
    ("CogComp/trec", None): Copy("trec", {"train": ("train", "validation"), "test": ("test",)},
                                 renames={"label": "coarse_label"}),
    # the original MSRP files: train/validation split like GLUE's (other 408 pairs held out), untokenised text;
    # the copy's labeled test.tsv is left out because the hub's test labels are hidden (-1)
    ("nyu-mll/glue", "mrpc"): Copy("mrpc", {"train": ("train",), "validation": ("validation",)},
                                   class_names={"label": ("not_equivalent", "equivalent")}),
    # 5,000 of the hub's 14,041 training sentences, complete validation and test
    ("eriktks/conll2003", None): Copy("conll2003", {"train": ("train",), "validation": ("validation",),
                                                    "test": ("test",)}),
}


@dataclass(frozen=True)
class Source:
    """Where ``data.path`` was found, and how its splits are read."""

    kind: Literal["folder", "files", "saved", "repo", "hub"]
    """folder: a local folder read as it stands (no roles to assemble); files: split files in a folder;
    saved: a ``save_to_disk`` folder; repo: a download of a hub repository; hub: ``datasets.load_dataset``."""
    folder: Path | None
    origin: str
    """For the log and the model card, e.g. "this project's copy /data/sst2"."""
    copy: Copy | None = None

    @property
    def assembled(self) -> bool:
        """True when roles are assembled here (see ``load_roles``); False: read the folder as it stands."""
        return self.kind != "folder"


def data_dir() -> Path:
    """${FINETUNE_DATA_DIR}: this project's data copies (default ../shared/data next to the repo)."""
    return Path(expand_path("${FINETUNE_DATA_DIR}"))


def _mirror_key(cfg: DataConfig) -> str:
    return f"{cfg.path}:{cfg.name}" if cfg.name else cfg.path


def _folder_kind(folder: Path, split: str) -> Literal["files", "saved", "repo"]:
    if (folder / "dataset_dict.json").is_file():
        return "saved"
    if any((folder / f"{split}{ext}").is_file() for ext in EXTENSIONS):
        return "files"
    return "repo"


def locate(cfg: DataConfig) -> Source:
    """Find ``cfg.path``: a local folder, a mirror entry, this project's copy, or the hub (in that order).

    Raises:
        DataError: a mirror entry names a folder that does not exist.
    """
    local = Path(expand_path(cfg.path))
    if local.exists() or not HUB_ID.fullmatch(cfg.path):  # what is not an id is a path (the loader names it)
        carve = cfg.splits.validation_from_train is not None
        return Source("files" if carve and local.is_dir() else "folder", local, f"local folder {local}")
    if cfg.revision is None:
        key = _mirror_key(cfg)
        mirrors = user_mirrors()
        if key in mirrors:
            folder = mirrors[key]
            if not folder.is_dir():
                raise DataError(f"data.path: $FINETUNE_MIRRORS ({os.environ['FINETUNE_MIRRORS']}) maps '{key}' "
                                f"to {folder}, which is not a folder")
            return Source(_folder_kind(folder, cfg.splits.train), folder, f"mirror {folder}")
        copy = COPIES.get((cfg.path, cfg.name))
        if copy is not None and (data_dir() / copy.folder).is_dir():
            folder = data_dir() / copy.folder
            return Source("files", folder, f"this project's copy {folder}", copy)
    return Source("hub", None, "the hub")


def describe(cfg: DataConfig) -> str:
    """Where the data comes from, in one line (for logs and model cards)."""
    source = locate(cfg)
    if source.origin.startswith("local folder"):
        return str(source.folder)
    name = f"{cfg.path} ({cfg.name})" if cfg.name else cfg.path
    revision = f" at revision {cfg.revision}" if cfg.revision else ""
    return f"{name}{revision} from {source.origin}"


def local_files(cfg: DataConfig) -> list[Path]:
    """The local files this recipe's data is read from (e.g. to fingerprint them); [] for hub data."""
    source = locate(cfg)
    if source.folder is None or not source.folder.is_dir():
        return []
    if source.kind in ("saved", "repo"):
        return sorted(p for p in source.folder.rglob("*") if p.is_file())
    stems = _stems(source, cfg) if source.copy else list(cfg.splits.named().values())
    return [source.folder / f"{stem}{ext}" for stem in stems for ext in EXTENSIONS
            if (source.folder / f"{stem}{ext}").is_file()]


# --- reading --------------------------------------------------------------------------------


def _stems(source: Source, cfg: DataConfig) -> list[str]:
    """The copy's file stems that hold the splits the recipe names, in first-use order."""
    stems: list[str] = []
    for role, split in cfg.splits.named().items():
        if split not in source.copy.splits:
            raise DataError(
                f"data.splits.{role}: {cfg.path}{f' ({cfg.name})' if cfg.name else ''} as read from {source.origin} "
                f"has splits {sorted(source.copy.splits)}, not '{split}'")
        stems += [s for s in source.copy.splits[split] if s not in stems]
    return stems


def _read_files(source: Source, cfg: DataConfig, read_folder: Callable[[DataConfig], datasets.DatasetDict],
                ) -> dict[str, datasets.Dataset]:
    """Split name -> rows, read through the local-file loader (its checks apply) from the folder's files."""
    names = _stems(source, cfg) if source.copy else list(dict.fromkeys(cfg.splits.named().values()))
    if len(names) > len(ROLES):
        raise DataError(f"data.splits: {source.origin} would need {len(names)} files read at once, at most 3")
    # the loader reads at most one file per role; a folder's own files keep their roles
    slots = dict(zip(ROLES, names)) if source.copy else cfg.splits.named()
    plain = cfg.model_copy(update={
        "path": str(source.folder), "format": "auto" if source.copy else cfg.format,
        "splits": SplitsConfig.model_construct(train=slots["train"], validation=slots.get("validation"),
                                               test=slots.get("test"), validation_from_train=None),
        "max_train_samples": None, "max_eval_samples": None, "max_test_samples": None})
    read = read_folder(plain)
    by_stem = {stem: read[role] for role, stem in slots.items()}
    if source.copy is None:
        return by_stem
    out = {}
    for split, stems in source.copy.splits.items():
        if all(s in by_stem for s in stems):
            parts = [by_stem[s] for s in stems]
            rows = parts[0] if len(parts) == 1 else ingest.join(parts)
            if source.copy.renames:
                rows = _same_rows(rows.rename_columns(
                    {a: b for a, b in source.copy.renames.items() if a in rows.column_names}), rows)
            for column, names_ in source.copy.class_names.items():
                rows = _as_class_names(rows, column, list(names_), f"{source.folder}/{'+'.join(stems)}")
            out[split] = rows
    return out


def _read_hub(cfg: DataConfig, source: Source) -> dict[str, datasets.Dataset]:
    """Every split of a hub data set, a ``save_to_disk`` folder or a downloaded hub repository."""
    where = f"'{cfg.path}'" + (f" (name {cfg.name})" if cfg.name else "")
    try:
        if source.kind == "saved":
            loaded = datasets.load_from_disk(str(source.folder), keep_in_memory=True)  # caches not beside it
        elif source.kind == "repo":
            loaded = datasets.load_dataset(str(source.folder), cfg.name)
        else:
            loaded = datasets.load_dataset(cfg.path, cfg.name, revision=cfg.revision)
    except Exception as err:  # offline, unknown id or configuration, network, unreadable files
        if source.kind == "hub" and _offline(err):
            off = "not in the datasets cache, and the hub is off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)"
            if cfg.revision:
                raise DataError(
                    f"data.path: cannot find data set {where} at data.revision={cfg.revision} offline: mirrors and "
                    f"this project's copies have no revisions, so they are skipped, and it is {off}. Drop "
                    "data.revision to use a mirror entry, or set data.path to a local folder") from None
            mirrors = os.environ.get("FINETUNE_MIRRORS")
            looked = f"no entry '{_mirror_key(cfg)}' in $FINETUNE_MIRRORS ({mirrors})" if mirrors else \
                "$FINETUNE_MIRRORS unset"
            copy = COPIES.get((cfg.path, cfg.name))
            shipped = f"its copy {data_dir() / copy.folder} is missing (set $FINETUNE_DATA_DIR)" if copy else \
                f"not one of this project's copies in {data_dir()}"
            raise DataError(
                f"data.path: cannot find data set {where} offline: no local folder of that name, {looked}, "
                f"{shipped}, {off}. Add a mirror entry to the YAML file "
                f"named by $FINETUNE_MIRRORS, e.g. '{_mirror_key(cfg)}: /data/{cfg.path.split('/')[-1]}' (a folder "
                "of <split>.tsv/csv/json/jsonl/parquet files), or set data.path to such a folder") from None
        first = " ".join(str(err).split())[:300]
        raise DataError(f"data.path: could not load data set {where} from {source.origin}: "
                        f"{type(err).__name__}: {first}") from None
    if isinstance(loaded, datasets.Dataset):  # a single saved split
        loaded = datasets.DatasetDict({"train": loaded})
    return dict(loaded)


def _offline(err: Exception) -> bool:
    offline = constants.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE
    return offline and isinstance(err, (ConnectionError, FileNotFoundError)) or "OfflineModeIsEnabled" in str(err)


def _column(ds: datasets.Dataset, column: str) -> list:
    """One column as a Python list, through Arrow (iterating ``ds[column]`` goes row by row)."""
    return ds.with_format("arrow")[column].to_pylist()


def _as_class_names(ds: datasets.Dataset, column: str, names: list[str], where: str) -> datasets.Dataset:
    """Integer class ids (or lists of them) -> class names, as the hub's ClassLabel features mean them.

    Raises:
        DataError: an id outside the classes, e.g. -1 for a split whose labels are hidden.
    """
    if column not in ds.column_names:
        return ds
    values = _column(ds, column)
    is_list = bool(values) and isinstance(values[0], list)
    flat = [v for seq in values for v in seq] if is_list else values
    bad = [v for v in flat if not isinstance(v, int) or not 0 <= v < len(names)]
    if bad:
        raise DataError(f"{where}: column '{column}' " + (
            "is unlabeled (every value is -1: its labels are hidden); name a labeled split for this role, "
            "or null for test" if all(v == -1 for v in flat) else
            f"has {len(bad)} value(s) like {bad[0]!r} outside its {len(names)} classes {names}"))

    def named(batch):
        return {column: [[names[v] for v in seq] if isinstance(seq, list) else names[seq] for seq in batch[column]]}

    features = ds.features.copy()  # say it: a ClassLabel column would encode the names back into ids
    features[column] = datasets.List(datasets.Value("string")) if is_list else datasets.Value("string")
    # the result is cached in datasets' own cache, never beside the rows (a mirror folder may be read-only)
    fingerprint = hashlib.blake2b(f"{ds._fingerprint}|{column}|{names}".encode(), digest_size=8).hexdigest()
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "finetune-class-names" / f"{fingerprint}.arrow"
    cache.parent.mkdir(parents=True, exist_ok=True)
    mapped = ds.map(named, batched=True, features=features, new_fingerprint=fingerprint,
                    cache_file_name=str(cache), desc=f"class names of {column}")
    return _same_rows(mapped, ds)


def _hub_class_names(rows: dict[str, datasets.Dataset], cfg: DataConfig,
                     origin: str) -> dict[str, datasets.Dataset]:
    """ClassLabel columns (label or tags) of the splits the recipe uses -> their class names; every
    split is checked before any is converted."""
    todo = []
    for role, split in cfg.splits.named().items():
        ds = rows[split]
        for column in sorted({cfg.columns.label, cfg.columns.tags} & set(ds.column_names)):
            feature = ds.features[column]
            label = feature if isinstance(feature, datasets.ClassLabel) else getattr(feature, "feature", None)
            if isinstance(label, datasets.ClassLabel):  # also a list of ClassLabel (token tags)
                todo.append((split, column, list(label.names), f"data.splits.{role}: split '{split}' of {origin}"))
    for split, column, names, where in todo:
        ids = _column(rows[split], column)
        if ids and all(v == -1 for seq in ids for v in (seq if isinstance(seq, list) else [seq])):
            raise DataError(f"{where}: column '{column}' is unlabeled (every value is -1: its labels are hidden); "
                            "name a labeled split for this role, or null for test")
    out, once = dict(rows), {}
    for item in todo:  # a split two roles share is converted once
        once.setdefault(item[:2], item)
    for split, column, names, where in once.values():
        out[split] = _as_class_names(out[split], column, names, where)
    return out


# --- roles and the carve-out ------------------------------------------------------------------


def load_roles(source: Source, cfg: DataConfig,
               read_folder: Callable[[DataConfig], datasets.DatasetDict]) -> datasets.DatasetDict:
    """The roles the recipe names (train/validation/test), read from ``source`` and, with
    ``data.splits.validation_from_train``, validation carved out of train. Subsampling is left to the caller.

    Raises:
        DataError: a split is missing or unlabeled, the carve-out leaves nothing, or loading failed (one line).
    """
    name = f"{cfg.path} ({cfg.name})" if cfg.name else cfg.path
    log.info("data %s: reading %s", name, source.origin)
    wanted = cfg.splits.named()
    if source.kind == "files":
        rows = _read_files(source, cfg, read_folder)
    else:
        rows = _read_hub(cfg, source)
        missing = {role: split for role, split in wanted.items() if split not in rows}
        if missing:
            role, split = next(iter(missing.items()))
            raise DataError(f"data.splits.{role}: {name} from {source.origin} has splits {sorted(rows)}, not '{split}'")
        rows = _hub_class_names(rows, cfg, f"{name} from {source.origin}")
    raw = datasets.DatasetDict({role: rows[split] for role, split in wanted.items()})
    carve = cfg.splits.validation_from_train
    if carve is not None:
        train, validation = carve_validation(raw["train"], carve, cfg.subsample_seed, cfg)
        raw = datasets.DatasetDict({"train": train, "validation": validation,
                                    **({"test": raw["test"]} if "test" in raw else {})})
        log.info("data %s: validation = %d rows carved from '%s' (seed %d), %d left to train",
                 name, len(validation), cfg.splits.train, cfg.subsample_seed, len(train))
    return raw


def _row_columns(ds: datasets.Dataset, cfg: DataConfig) -> list[str]:
    """The columns a recipe reads: a row's identity for the carve-out (ids and extra columns ignored)."""
    c = cfg.columns
    used = [col for col in (c.text, c.text_pair, c.label, c.tokens, c.tags) if col and col in ds.column_names]
    return list(dict.fromkeys(used)) or ds.column_names


def carve_validation(train: datasets.Dataset, carve: int | float, seed: int,
                     cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``train`` into (train, validation): ``carve`` rows (or that fraction, rounded) go to validation.

    A row's side depends only on the seed and the row's content (a keyed hash of the columns the recipe
    reads), not on its position, so the same rows in another order (the hub vs a local copy) split alike.

    Raises:
        DataError: the carve-out would leave no validation or no training row.
    """
    if cfg.splits.validation_by == "whole_text":
        return carve_whole_texts(train, carve, seed, cfg)
    size = carve if isinstance(carve, int) else round(len(train) * carve)
    if not 1 <= size < len(train):
        raise DataError(f"data.splits.validation_from_train={carve}: the training split '{cfg.splits.train}' has "
                        f"{len(train)} rows, which leaves {'no validation' if size < 1 else 'no training'} rows")
    columns = _row_columns(train, cfg)
    order = _seeded_order(train, columns, seed)
    held = np.sort(order[:size]).tolist()
    kept = np.sort(order[size:]).tolist()
    stamp = f"{train._fingerprint}|{carve}|{seed}|{columns}"
    return _part(train, kept, stamp, "train"), _part(train, held, stamp, "validation")


def _seeded_order(train: datasets.Dataset, columns: list[str], seed: int) -> np.ndarray:
    """Row indices in an order set by the seed and each row's content (a keyed hash), not its position."""
    key = str(seed).encode()
    values = zip(*(_column(train, col) for col in columns))
    ranks = np.fromiter((int.from_bytes(hashlib.blake2b(repr(row).encode(), digest_size=8, key=key).digest())
                         for row in values), dtype=np.uint64, count=len(train))
    return np.argsort(ranks, kind="stable")  # equal rows (same hash) keep their order


def _part(train: datasets.Dataset, rows: list[int], stamp: str, side: str) -> datasets.Dataset:
    # a fingerprint from the inputs: datasets would otherwise hash the index lists (a second on SST-2)
    fingerprint = hashlib.blake2b(f"{stamp}|{side}".encode(), digest_size=8).hexdigest()
    return _same_rows(train.select(rows, new_fingerprint=fingerprint), train, rows)


def carve_whole_texts(train: datasets.Dataset, carve: int | float, seed: int,
                      cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``validation_by=whole_text``: validation is ``carve`` (or that share) of the whole texts, the texts no
    other row contains as a run of its words; every row whose text lies inside a drawn one leaves training.

    Raises:
        DataError: a text pair or word-list task, or the carve-out would leave no validation or no training row.
    """
    if cfg.columns.text_pair is not None or cfg.columns.text not in train.column_names:
        raise DataError("data.splits.validation_by=whole_text reads one text column (data.columns.text); this "
                        "recipe reads text pairs or word lists: use validation_by=row")
    words = [" ".join(str(text).split()).split(" ") for text in _column(train, cfg.columns.text)]
    # Longest first: a text is whole unless a longer whole text contains it (containment is transitive,
    # so only the runs of whole texts need keeping: a few million for SST-2's ~9,000 sentences)
    inside: set[int] = set()
    whole: list[int] = []
    for i in sorted(range(len(words)), key=lambda i: -len(words[i])):
        if hash(" ".join(words[i])) not in inside:
            whole.append(i)
            inside.update(_runs(words[i]))
    size = carve if isinstance(carve, int) else round(len(whole) * carve)
    if not 1 <= size < len(whole):
        raise DataError(f"data.splits.validation_from_train={carve} with validation_by=whole_text: the training "
                        f"split '{cfg.splits.train}' has {len(whole)} whole texts, which leaves "
                        f"{'no validation' if size < 1 else 'no training'} texts")
    whole_rows = train.select(sorted(whole))
    chosen = np.asarray(sorted(whole))[_seeded_order(whole_rows, _row_columns(train, cfg), seed)[:size]]
    held_runs = set().union(*(_runs(words[i]) for i in chosen.tolist()))
    held = np.sort(chosen).tolist()
    taken = set(held)
    kept = [i for i in range(len(words)) if i not in taken and hash(" ".join(words[i])) not in held_runs]
    log.info("data: whole-text validation: %d of %d whole texts; %d rows inside them leave training with them",
             size, len(whole), len(words) - len(kept) - size)
    stamp = f"{train._fingerprint}|{carve}|{seed}|whole_text|{cfg.columns.text}"
    return _part(train, kept, stamp, "train"), _part(train, held, stamp, "validation")


def _runs(words: list[str]) -> set[int]:
    """Hashes of every run of consecutive words (the text itself included)."""
    return {hash(" ".join(words[a:b])) for a in range(len(words)) for b in range(a + 1, len(words) + 1)}


def _same_rows(new: datasets.Dataset, old: datasets.Dataset, kept: list[int] | None = None) -> datasets.Dataset:
    """Carry ingest's record of each row's file and line over to ``new`` (``old``, or its rows ``kept``)."""
    origin = ingest.origin_of(old)
    if origin is not None:
        ingest.remember(new, origin if kept is None else origin.derive(kept))
    return new
