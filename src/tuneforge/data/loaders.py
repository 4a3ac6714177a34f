"""Stream raw records out of data files, each tagged with where it came from.

Supported files: ``.jsonl`` (one JSON object a line), ``.json`` (an array of objects, or one object
with a list under ``data``), ``.csv`` and ``.parquet``, optionally gzipped (``.jsonl.gz``).
Nothing is dropped here: a line that is not valid JSON comes out as a :class:`RawRecord` with
``error`` set, so callers can count it and put it in a rejects file.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tuneforge.data import jsonio

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataFileError(ValueError):
    """A data file that cannot be read at all (missing, unknown type)."""


@dataclass
class RawRecord:
    source: str                  # file path as given
    line: int                    # 1-based line for jsonl/csv; 1-based element index for json arrays / parquet rows
    data: dict[str, Any] | None  # the parsed object, None when it could not be parsed
    raw: str | None = None       # the raw text when it could not be parsed (kept verbatim for rejects)
    error: str | None = None     # why it could not be parsed

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def error_check(error: str) -> str:
    """The check name of a :attr:`RawRecord.error`: ``invalid_utf8``, ``not_object`` or ``not_json``."""
    if "UTF-8" in error:
        return "invalid_utf8"
    if error.startswith("expected a JSON object"):
        return "not_object"
    return "not_json"


def data_suffix(path: str | Path) -> str:
    name = str(path).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise DataFileError(
        f"{path}: unsupported data file type; use one of {', '.join(SUPPORTED_SUFFIXES)} (optionally .gz)"
    )


def _open_text(path: Path) -> io.TextIOBase:
    if str(path).lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="surrogateescape", newline="")
    return open(path, encoding="utf-8", errors="surrogateescape", newline="")


def iter_records(path: str | Path) -> Iterator[RawRecord]:
    """Yield every record of ``path`` in file order, streaming where the format allows."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: data file not found")
    suffix = data_suffix(path)
    if suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        yield from _iter_json(path)
    elif suffix == ".csv":
        yield from _iter_csv(path)
    else:
        yield from _iter_parquet(path)


def _has_bad_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def iter_jsonl_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every non-blank line of a ``.jsonl`` file, unparsed (see :func:`parse_jsonl_line`)."""
    with _open_text(Path(path)) as f:
        for number, line in enumerate(f, start=1):
            text = line.rstrip("\r\n")
            if text.strip():
                yield number, text


def parse_jsonl_line(source: str, number: int, text: str) -> RawRecord:
    """One non-blank ``.jsonl`` line as a :class:`RawRecord` (``error`` set when it is not a JSON object)."""
    if _has_bad_utf8(text):
        return RawRecord(source, number, None, raw=text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
                         error="invalid UTF-8")
    try:
        obj = jsonio.loads(text)
    except json.JSONDecodeError as e:
        return RawRecord(source, number, None, raw=text, error=f"not JSON: {e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        return RawRecord(source, number, None, raw=text, error=f"expected a JSON object, got {type(obj).__name__}")
    return RawRecord(source, number, obj)


def _iter_jsonl(path: Path) -> Iterator[RawRecord]:
    source = str(path)
    for number, text in iter_jsonl_lines(path):
        yield parse_jsonl_line(source, number, text)


def _iter_json(path: Path) -> Iterator[RawRecord]:
    """Stream the elements of a top-level JSON array (constant memory); ``{"data": [...]}`` is read whole."""
    with _open_text(path) as f:
        head = f.read(1 << 16)
        stripped = head.lstrip()
        if stripped.startswith("["):
            yield from _iter_json_array(path, f, stripped[1:])
            return
        text = head + f.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFileError(
            f"{path}:{e.lineno}: not valid JSON ({e.msg}); a .json file must hold one array of records "
            "(use .jsonl for one record per line)"
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataFileError(f"{path}: a .json data file must hold an array of records, got {type(obj).__name__}")
    for index, item in enumerate(obj, start=1):
        yield _json_item(path, index, item)


def _json_item(path: Path, index: int, item: Any) -> RawRecord:
    if isinstance(item, dict):
        return RawRecord(str(path), index, item)
    return RawRecord(str(path), index, None, raw=json.dumps(item)[:10000],
                     error=f"expected a JSON object, got {type(item).__name__}")


def _iter_json_array(path: Path, f: io.TextIOBase, buffer: str, chunk: int = 1 << 20) -> Iterator[RawRecord]:
    """Decode one array element at a time with ``raw_decode``, reading ``chunk`` characters as needed."""
    decoder = json.JSONDecoder()
    index, pos, eof = 0, 0, False
    while True:
        while pos < len(buffer) and buffer[pos] in " \t\r\n,":
            pos += 1
        if pos < len(buffer) and buffer[pos] == "]":
            return
        if pos >= len(buffer):
            if eof:
                raise DataFileError(f"{path}: the JSON array is not closed with ']' (file truncated?)")
            buffer, pos = buffer[pos:] + f.read(chunk), 0
            eof = eof or len(buffer) == 0
            continue
        try:
            item, end = decoder.raw_decode(buffer, pos)
        except json.JSONDecodeError as e:
            if not eof:  # the element may continue in the next chunk
                more = f.read(chunk)
                eof = not more
                buffer, pos = buffer[pos:] + more, 0
                continue
            raise DataFileError(f"{path}: element {index + 1} of the array is not valid JSON ({e.msg}); "
                                "a .json file must hold one array of records") from e
        if end == len(buffer) and not eof:  # a number may be cut at the chunk edge: read on and decode again
            more = f.read(chunk)
            if more:
                buffer, pos = buffer[pos:] + more, 0
                continue
            eof = True
        index += 1
        yield _json_item(path, index, item)
        pos = end
        if pos > chunk:
            buffer, pos = buffer[pos:], 0


def _iter_csv(path: Path) -> Iterator[RawRecord]:
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield RawRecord(str(path), reader.line_num, None, raw=None, error=f"CSV error: {e}")
                continue
            extra = row.pop(None, None)
            if extra:
                yield RawRecord(str(path), reader.line_num, None, raw=json.dumps(list(row.values()) + extra),
                                error=f"row has {len(extra)} more fields than the header")
                continue
            yield RawRecord(str(path), reader.line_num, dict(row))


def _iter_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            index += 1
            yield RawRecord(str(path), index, row)
