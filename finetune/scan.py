"""The scan: one cheap pass over a split file's raw bytes before ``datasets`` reads it (step 1 of
``finetune.ingest``). It checks what pandas/pyarrow would misread in silence or only report in a long
traceback (invalid UTF-8, unbalanced quotes, ragged rows, a repeated header line) and records the line
each row starts on (``Origin``), so every later check names the file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from finetune.errors import DataError

DELIMITERS = {"tsv": "\t", "csv": ","}
CATEGORICAL = 50  # a column with at most this many distinct values looks like labels (see _swallowed)


def first_line(err: BaseException) -> str:
    """The innermost cause's message, on one line (datasets wraps the real error in its own)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


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
            raise DataError(f"{path}: not a readable parquet file ({first_line(err)})") from None
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
