"""Data ingest you can trust: every local split file goes through one checked path.

1. ``scan_file``: one cheap pass over the raw bytes before ``datasets`` reads them. It checks what
   pandas/pyarrow would misread in silence or only report in a long traceback (invalid UTF-8,
   unbalanced quotes, ragged rows, a repeated header line) and records the line each row starts on.
2. ``read_file``: ``datasets`` loads the file (its arrow cache keeps repeated runs fast); a library
   error becomes one line naming the file and line, and its row count must equal the scan's.
3. ``check_rows``: empty texts, missing labels, tokens vs tags, under the ``data.on_*`` policies.

Each loaded split remembers where its rows came from (``origin``), so later checks (labels, in
``finetune.data.label_names``) name the file and line too. ``finetune.data_report`` summarises them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finetune.config import DataConfig
from finetune.errors import DataError
from finetune.scan import (  # noqa: F401  (re-exported: a split's origin is asked of finetune.ingest)
    DELIMITERS,
    Origin,
    decode,
    first_line,
    join,
    origin_of,
    remember,
    scan_file,
    source_of,
    where,
)

log = logging.getLogger("finetune")

BUILDERS = {  # file format -> datasets builder and its options (TSV/CSV: keep "NA"/"null" as text)
    "tsv": ("csv", {"delimiter": "\t", "keep_default_na": False}),
    "csv": ("csv", {"keep_default_na": False}),
    "json": ("json", {}), "jsonl": ("json", {}), "parquet": ("parquet", {}),
}


# --- 2. loading -------------------------------------------------------------------------------


def read_file(path: Path, fmt: str, split: str | None = None) -> datasets.Dataset:
    """Scan, then load one file with ``datasets``; the Dataset remembers its origin. ``split``: the
    split the file holds, named in the error for a file without rows."""
    origin = scan_file(path, fmt)
    no_rows = DataError((f"data: split '{split}' ({path})" if split else f"{path}") + " has no rows" +
                        (" (only a header line)" if fmt in DELIMITERS and path.stat().st_size else " (empty file)"))
    if origin.rows_read == 0:
        raise no_rows
    builder, kwargs = BUILDERS[fmt]
    json_log = logging.getLogger("datasets.packaged_modules.json.json")
    level = json_log.level
    json_log.setLevel(logging.CRITICAL)  # it logs the error that we turn into one line
    try:
        ds = datasets.load_dataset(builder, data_files={split or "train": str(path)}, split=split or "train", **kwargs)
    except Exception as err:  # DatasetGenerationError, ArrowInvalid, ParserError...: one line with file and line
        located = _locate_json_problem(path) if fmt in ("json", "jsonl") and origin.unit == "line" else None
        raise (located or DataError(f"{path}: could not be read as {fmt}: {first_line(err)}")) from None
    finally:
        json_log.setLevel(level)
    if len(ds) == 0:
        raise no_rows
    if origin.unit == "row":  # JSON arrays and parquet files number their records
        origin = Origin(str(path), list(range(1, len(ds) + 1)), "row", len(ds))
    elif len(ds) != origin.rows_read:
        raise _count_mismatch(path, ds, origin)
    return remember(ds, origin)


def _locate_json_problem(path: Path) -> DataError | None:
    """The first line that is not a JSON object (mixed value types are no error: datasets reads them as Json)."""
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), start=1):
        try:
            record = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as err:
            return DataError(f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno})")
        if not isinstance(record, dict):
            return DataError(f"{path} line {number}: expected one JSON object per line, got {type(record).__name__}")
    return None


def _count_mismatch(path: Path, ds: datasets.Dataset, origin: Origin) -> DataError:
    """The library read another number of rows than the scan found: name the first row whose first
    field differs (the scan's csv reading against the library's)."""
    first = min(len(ds), origin.rows_read)
    if path.suffix in (".tsv", ".csv"):
        text = path.read_text(encoding="utf-8-sig")
        records = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=DELIMITERS[path.suffix[1:]]) if r]
        mine, theirs = [r[0] for r in records[1:first + 1]], [str(v) for v in ds[ds.column_names[0]][:first]]
        first = next((row for row, (a, b) in enumerate(zip(mine, theirs)) if a != b), first)
    line = origin.positions[first] if first < len(origin.positions) else "end"
    return DataError(f"{path} line {line}: read {len(ds)} rows but the file holds {origin.rows_read} data rows; "
                     "parsing goes wrong from this line (quoting?)")


# --- 3. row checks ----------------------------------------------------------------------------


def arrow_column(ds: datasets.Dataset, column: str) -> pa.ChunkedArray:
    if ds._indices is None:  # a freshly loaded table: read the column, no copy of the data set's format
        return ds.data.column(column)
    values = ds.with_format("arrow")[column]
    return values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])


def is_list_column(ds: datasets.Dataset, column: str) -> bool:
    kind = arrow_column(ds, column).type
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def empty_rows(ds: datasets.Dataset, column: str) -> np.ndarray:
    """Rows whose value is missing, text with nothing but whitespace, or an empty list."""
    if type(ds.features[column]).__name__ == "Json":  # mixed types, stored as JSON text: look at the values
        return np.array([i for i, v in enumerate(ds[column][:]) if v is None or v == [] or
                         (isinstance(v, str) and not v.strip())], dtype=np.int64)
    values = arrow_column(ds, column)
    missing = pc.is_null(values)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0)
        missing = pc.or_(missing, pc.fill_null(blank, True))
    elif pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        missing = pc.or_(missing, pc.fill_null(pc.equal(pc.list_value_length(values), 0), True))
    return np.flatnonzero(missing.to_numpy(zero_copy_only=False))


@dataclass
class _Finding:
    rows: np.ndarray
    what: str
    column: str
    key: str
    policy: str


def check_rows(cfg: DataConfig, raw: datasets.DatasetDict) -> datasets.DatasetDict:
    """Empty texts and missing labels (error or drop, by policy) and tokens vs tags, split by split.

    Token classification is recognised by its tokens column holding lists; there the tokens are the
    text and the tags the label. Multi-label data (``data.label_separator`` is set) holds label sets: an
    empty list or empty cell says that no label applies, only a missing value (null, absent) is missing.
    Columns a split lacks are left to the column checks downstream.
    """
    cols, label_sets = cfg.columns, cfg.label_separator is not None
    for split, ds in list(raw.items()):
        token_mode = cols.tokens in ds.column_names and is_list_column(ds, cols.tokens)
        texts = [cols.tokens] if token_mode else [c for c in (cols.text, cols.text_pair) if c and c in ds.column_names]
        label = cols.tags if token_mode else cols.label
        if token_mode and label in ds.column_names:
            check_tags(ds, split, cols.tokens, label)
        findings = {
            "empty_text": _Finding(np.unique(np.concatenate([empty_rows(ds, c) for c in texts] + [np.zeros(0, int)])),
                                   "empty or whitespace-only text", "/".join(texts), "data.on_empty_text",
                                   cfg.on_empty_text),
            "missing_label": _Finding(_missing(ds, label, label_sets) if label in ds.column_names else np.zeros(0, int),
                                      "no label", label, "data.on_missing_label", cfg.on_missing_label),
        }
        origin = origin_of(ds) or Origin(f"split '{split}'", list(range(1, len(ds) + 1)), "row", len(ds), is_file=False)
        drop: set[int] = set()
        for reason, found in findings.items():
            if not len(found.rows):
                continue
            if found.policy == "error":
                unlabeled = reason == "missing_label" and len(found.rows) == len(ds) and split != "train"
                raise DataError(f"{where(ds, split, int(found.rows[0]))}: {found.what} in column {found.column!r} "
                                f"({len(found.rows)} such row(s) in split '{split}'); " +
                                (f"an unlabeled split can't be scored: set data.splits.{split}: null" if unlabeled
                                 else f"fix them, or set {found.key}: drop to skip them"))
            log.warning("data: dropped %d row(s) of %s with %s in column %r (%s: drop)",
                        len(found.rows), source_of(ds, split), found.what, found.column, found.key)
            drop.update(found.rows.tolist())
        if drop:
            kept = [i for i in range(len(ds)) if i not in drop]
            if not kept:
                raise DataError(f"data: every row of {source_of(ds, split)} would be dropped (empty texts or labels)")
            origin = origin.derive(kept)
            for reason, found in findings.items():
                if len(found.rows):
                    origin.dropped[reason] = origin.dropped.get(reason, 0) + len(found.rows)
            ds = ds.select(kept)
        raw[split] = remember(ds, origin)
    return raw


def _missing(ds: datasets.Dataset, column: str, label_sets: bool) -> np.ndarray:
    """Rows without a label: empty ones (``empty_rows``), or for label sets only null ones."""
    if not label_sets:
        return empty_rows(ds, column)
    return np.array([i for i, v in enumerate(ds[column][:]) if v is None], dtype=np.int64)


def require_lists(ds: datasets.Dataset, split: str, column: str, what: str) -> None:
    """A column of lists (tokens, tags); else name the first row whose value is not a list."""
    if not is_list_column(ds, column):
        row = next((i for i, v in enumerate(ds[column][:]) if not isinstance(v, list)), 0)
        raise DataError(f"{where(ds, split, row)}: column {column!r} holds {type(ds[row][column]).__name__} "
                        f"{ds[row][column]!r:.40}, expected {what} (token classification)")


def check_tags(ds: datasets.Dataset, split: str, tokens: str, tags: str) -> None:
    require_lists(ds, split, tags, "a list with one tag per word")
    counts = pc.fill_null(pc.list_value_length(arrow_column(ds, tags)), -1).to_numpy(zero_copy_only=False)
    words = pc.fill_null(pc.list_value_length(arrow_column(ds, tokens)), -1).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero((counts != words) & (counts >= 0) & (words >= 0))
    if len(wrong):
        row = int(wrong[0])
        raise DataError(f"{where(ds, split, row)}: {words[row]} tokens but {counts[row]} tags in column {tags!r} "
                        f"({len(wrong)} such row(s) in split '{split}'); each word needs exactly one tag")


def label_text(value) -> str:
    """A label as its class name: integer-valued floats (1.0, as pandas reads a column with gaps) as '1'."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
