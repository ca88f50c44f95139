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
import dataclasses
import io
import json
import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finetune.config import DataConfig
from finetune.errors import DataError

log = logging.getLogger("finetune")

BUILDERS = {  # file format -> datasets builder and its options (TSV/CSV: keep "NA"/"null" as text)
    "tsv": ("csv", {"delimiter": "\t", "keep_default_na": False}),
    "csv": ("csv", {"keep_default_na": False}),
    "json": ("json", {}), "jsonl": ("json", {}), "parquet": ("parquet", {}),
}
DELIMITERS = {"tsv": "\t", "csv": ","}
CATEGORICAL = 50  # a column with at most this many distinct values looks like labels (see _swallowed)


@dataclass
class Origin:
    """Where the rows of a loaded split came from: the file, and the line (or record) of each row."""
    source: str
    positions: list[int]
    """1-based line each row starts on (``unit="line"``) or record number (``unit="row"``)."""
    unit: str = "line"
    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Rows dropped by a data.on_* policy, by reason."""
    subsampled_from: int | None = None
    is_file: bool = True
    """False for a hub split or an in-memory data set (``source`` then names the split)."""
    row_sources: list[str] | None = None
    """Rows joined from several files (``join``): each row's file; ``source`` then names them all."""

    def where(self, row: int) -> str:
        source = self.row_sources[row] if self.row_sources else self.source
        return f"{source} {self.unit} {self.positions[row]}"

    def derive(self, kept: list[int] | np.ndarray, **changes) -> Origin:
        """The origin of ``ds.select(kept)``."""
        row_sources = [self.row_sources[i] for i in kept] if self.row_sources else None
        return dataclasses.replace(self, positions=[self.positions[i] for i in kept], dropped=dict(self.dropped),
                                   row_sources=row_sources, **changes)


_origins: weakref.WeakKeyDictionary[datasets.Dataset, Origin] = weakref.WeakKeyDictionary()


def remember(ds: datasets.Dataset, origin: Origin) -> datasets.Dataset:
    _origins[ds] = origin
    return ds


def origin_of(ds: datasets.Dataset) -> Origin | None:
    return _origins.get(ds)


def join(parts: list[datasets.Dataset]) -> datasets.Dataset:
    """Splits read from several files as one (e.g. a hub train split kept here as train + validation files),
    each row still naming its file and line, and the drops of every part counted."""
    rows = datasets.concatenate_datasets(parts)
    origins = [origin_of(part) for part in parts]
    if any(origin is None for origin in origins):
        return rows
    dropped: dict[str, int] = {}
    for origin in origins:
        for reason, count in origin.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
    return remember(rows, Origin(" + ".join(o.source for o in origins), [p for o in origins for p in o.positions],
                                 origins[0].unit, sum(o.rows_read for o in origins), dropped,
                                 is_file=all(o.is_file for o in origins),
                                 row_sources=[o.source for o in origins for _ in o.positions]))


def where(ds: datasets.Dataset, split: str, row: int) -> str:
    """'FILE line N' for a row of a loaded file, else "split 'NAME' row N"."""
    origin = origin_of(ds)
    return origin.where(row) if origin is not None else f"split '{split}' row {row + 1}"


def source_of(ds: datasets.Dataset, split: str) -> str:
    origin = origin_of(ds)
    return f"split '{split}' ({origin.source})" if origin is not None and origin.is_file else f"split '{split}'"


# --- 1. the scan ------------------------------------------------------------------------------


def decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        number, column = data.count(b"\n", 0, err.start) + 1, err.start - data.rfind(b"\n", 0, err.start)
        raise DataError(f"{path} line {number}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column "
                        f"{column}); save the file as UTF-8") from None


def scan_file(path: Path, fmt: str) -> Origin:
    """Check a file's structure and find the line each data row starts on (see the module doc)."""
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as err:  # pyarrow's errors have no common base worth naming
            raise DataError(f"{path}: not a readable parquet file ({_one_line(err)})") from None
        return Origin(str(path), list(range(1, rows + 1)), "row", rows)
    data = path.read_bytes()
    text = decode(path, data)
    if fmt in DELIMITERS:
        plain = data.removeprefix(b"\xef\xbb\xbf").replace(b"\r\n", b"\n")
        if b'"' in plain or b"\r" in plain:
            text = text.replace("\r\n", "\n")
            positions = _scan_quoted(path, text, DELIMITERS[fmt])
        else:
            positions = _scan_plain(path, plain, DELIMITERS[fmt])
        return Origin(str(path), positions, "line", len(positions))
    if fmt == "json" and text.lstrip().startswith("["):  # an array of records: no lines to name, records instead
        return Origin(str(path), [], "row", -1 if text.strip() != "[]" else 0)
    positions = [number for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    return Origin(str(path), positions, "line", len(positions))


def _blank(line: str, delimiter: str) -> bool:
    """What pandas skips as a blank line: only whitespace, no delimiter ("\\t" alone is a row of empties)."""
    return not line.strip() and delimiter not in line


def _scan_plain(path: Path, data: bytes, delimiter: str) -> list[int]:
    """No quotes, so one line is one row: counting the delimiters on each line checks the file (in numpy,
    so the common case costs a few milliseconds per 100k rows)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    breaks = np.flatnonzero(buf == ord("\n"))
    starts, ends = np.concatenate(([0], breaks + 1)), np.concatenate((breaks, [len(buf)]))
    delimiters = np.flatnonzero(buf == ord(delimiter))
    counts = np.searchsorted(delimiters, ends) - np.searchsorted(delimiters, starts)

    def line(index: int) -> str:
        return data[starts[index]:ends[index]].decode("utf-8")

    first = next((i for i in range(len(starts)) if not _blank(line(i), delimiter)), None)
    if first is None:
        return []
    header_line = line(first)
    header = header_line.split(delimiter)
    _check_header(path, header, first + 1)
    rest = np.arange(first + 1, len(starts))
    for index in rest[counts[rest] != len(header) - 1]:
        if not _blank(line(index), delimiter):
            raise _ragged(path, int(index) + 1, int(counts[index]) + 1, header, delimiter)
    rows = rest[counts[rest] == len(header) - 1]
    if len(header) == 1:  # no delimiter to tell a blank line from a row: look at those lines
        rows = np.array([i for i in rows if not _blank(line(i), delimiter)], dtype=np.int64)
    repeat = (b"\n" + data[starts[first]:ends[first]] + b"\n")
    at = (data + b"\n").find(repeat, int(ends[first]))
    if at >= 0:
        raise _repeated_header(path, int(np.searchsorted(breaks, at)) + 2)
    return (rows + 1).tolist()


def _scan_quoted(path: Path, text: str, delimiter: str) -> list[int]:
    """The csv module, strict: a quote that never closes or closes mid-field is an error, not a swallow."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header, positions, spans = None, [], []
    values: list[set[str]] = []  # distinct values per column, while few (label-like, see _swallowed)
    tracked: list[int] = []  # the columns still tracked: a column leaves past CATEGORICAL values
    end = 0
    try:
        for record in reader:
            number, end = end + 1, reader.line_num
            if not record or (len(record) == 1 and end == number and _blank(record[0], delimiter)):
                continue
            if header is None:
                header = record
                _check_header(path, header, number)
                values, tracked = [set() for _ in header], list(range(len(header)))
                continue
            if len(record) != len(header):
                raise _ragged(path, number, len(record), header, delimiter)
            if record == header:
                raise _repeated_header(path, number)
            positions.append(number)
            if end > number:
                spans.append((number, end))
            for column in tracked:
                seen = values[column]
                seen.add(record[column])
                if len(seen) > CATEGORICAL:
                    tracked = [c for c in tracked if c != column]
    except csv.Error as err:
        if "end of data" in str(err):
            raise DataError(f"{path} line {end + 1}: a double quote opens a field that never closes (the file "
                            f"ends inside it); close it, or write a literal quote as \"\"") from None
        raise DataError(f"{path} line {end + 1}: malformed quoting ({err}, at line {reader.line_num}); a quoted "
                        f"field must end with a quote followed by the delimiter or the line end") from None
    if spans and "\r" not in text:
        lines = text.split("\n")
        # label-like: few distinct values, some of them repeated (a text column rarely repeats)
        labels = [values[c] if c in tracked and len(values[c]) < len(positions) else None for c in range(len(values))]
        for first, last in spans:
            _swallowed(path, lines[first - 1:last], delimiter, labels, first, last)
    return positions


def _swallowed(path: Path, physical: list[str], delimiter: str, values: list[set[str] | None],
               first: int, last: int) -> None:
    """A quoted field may span lines; but when every line it swallowed but the last reads as a complete
    row (right field count, label-like columns holding values seen in other rows), an unbalanced
    quote ate those rows."""
    categorical = [column for column, seen in enumerate(values) if seen]
    if not categorical:
        return
    for line in physical[:-1]:
        fields = line.split(delimiter)
        if len(fields) != len(values) or any(fields[c].strip('"') not in values[c] for c in categorical):
            return
    raise DataError(f"{path} line {first}: a double quote opens a field that runs on to line {last}, swallowing "
                    f"{last - first} line(s) that read as rows of their own (an unbalanced quote?); close the quote "
                    f"where the field ends, or write a literal quote as \"\"")


def _check_header(path: Path, header: list[str], number: int) -> None:
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"{path} line {number}: column {repeated[0]!r} appears twice in the header {header}")


def _ragged(path: Path, number: int, fields: int, header: list[str], delimiter: str) -> DataError:
    hint = " (a tab inside a text? quote the field)" if delimiter == "\t" and fields > len(header) else ""
    return DataError(f"{path} line {number}: {fields} field(s), expected {len(header)} like the header "
                     f"{header}{hint}")


def _repeated_header(path: Path, number: int) -> DataError:
    return DataError(f"{path} line {number}: the header line repeats here (files joined together?); "
                     "remove it, it would be read as a row")


# --- 2. loading -------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    """The innermost cause's message, on one line (datasets wraps the real error in its own)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


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
        raise (located or DataError(f"{path}: could not be read as {fmt}: {_one_line(err)}")) from None
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
    text and the tags the label. Columns a split lacks are left to the column checks downstream.
    """
    cols = cfg.columns
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
            "missing_label": _Finding(empty_rows(ds, label) if label in ds.column_names else np.zeros(0, int),
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
