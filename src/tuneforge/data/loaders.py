"""Stream raw records out of data files, each tagged with where it came from.

Supported files: ``.jsonl`` (one JSON object a line), ``.json`` (an array of objects, or one object
with a list under ``data``), ``.csv`` and ``.parquet``, optionally gzipped (``.jsonl.gz``).
Nothing is dropped here: a line that is not valid JSON comes out as a :class:`RawRecord` with
``error`` set, so callers can count it and put it in a rejects file. So does the point where a truncated or
corrupt ``.gz`` stream breaks off (after every record before it; check ``truncated_file``).

A path that is not a file (a folder of shards, a ``save_to_disk`` folder, a Hub id) is read through
:mod:`tuneforge.data.sources`.

Lines are numbered as editors number them (:mod:`tuneforge.data.textfile`: a line ends at ``\\n``; a lone ``\\r``
is part of the line).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator, Protocol

from tuneforge.data import jsonio
from tuneforge.data.errors import DataFileError
from tuneforge.data.raw import SUPPORTED_SUFFIXES, RawRecord, data_suffix  # noqa: F401  (callers import them here)
from tuneforge.data.sources import iter_dataset_records, parse_source, shard_files, source_files, source_sha256
from tuneforge.data.textfile import TRUNCATED, TextFile

TRUNCATED_FILE = "truncated_file"           # the check of the reject where a compressed stream breaks off


def error_check(error: str) -> str:
    """The check name of a :attr:`RawRecord.error`: ``truncated_file``, ``invalid_utf8``, ``not_object`` or
    ``not_json``."""
    if error.startswith(TRUNCATED):
        return TRUNCATED_FILE
    if "UTF-8" in error:
        return "invalid_utf8"
    if error.startswith("expected a JSON object"):
        return "not_object"
    return "not_json"


def data_files(path: str | Path) -> list[Path]:
    """The data files of ``path``: the file itself, or every data file directly in a folder of shards, by name (all
    of one format: :func:`tuneforge.data.sources.shard_files`). A ``save_to_disk`` folder or a Hub id has none."""
    return source_files(path)


def data_sha256(path: str | Path) -> str:
    """The content hash of ``path``: a file's SHA-256; a folder of shards', the SHA-256 over its :func:`data_files`'
    names and hashes (a file added, removed or changed changes it); a ``save_to_disk`` folder's or a Hub id's, see
    :func:`tuneforge.data.sources.source_sha256`."""
    return source_sha256(path)


def iter_records(path: str | Path) -> Iterator[RawRecord]:
    """Yield every record of ``path`` in file order, streaming where the format allows. ``path`` may also be any
    source of :mod:`tuneforge.data.sources`: a folder of shards (its files one after another), a ``save_to_disk``
    folder or a Hub id (rows numbered from 1, the source named with its split)."""
    source = parse_source(path)
    if source.kind == "shards":
        for file in shard_files(source.location):
            yield from iter_records(file)
        return
    if source.kind in ("saved", "hub"):
        yield from iter_dataset_records(source)
        return
    path = Path(source.location)
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


def _readable(text: str) -> str:
    """``text`` with bytes that were not UTF-8 (lone surrogates) shown as U+FFFD, so it can be written out."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if _has_bad_utf8(text) else text


def truncation_record(source: str, error: str, line: int, raw: str) -> RawRecord:
    """The record standing for where a compressed stream broke off (:attr:`TextFile.error`): at ``line`` (for a
    ``.json`` file the element), with the incomplete text ``raw``."""
    return RawRecord(source, line, None, raw=_readable(raw) or None,
                     error=f"{error}; every record before this point was read, nothing after it could be: "
                           "re-create or re-download the file to use the rest")


def jsonl_lines(f: TextFile) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every non-blank line of an open ``.jsonl`` file, unparsed (see
    :func:`parse_jsonl_line`); after them check ``f.error`` (:func:`truncation_record`)."""
    for number, text in f.lines():
        if text.strip():
            yield number, text


def parse_jsonl_line(source: str, number: int, text: str) -> RawRecord:
    """One non-blank ``.jsonl`` line as a :class:`RawRecord` (``error`` set when it is not a JSON object)."""
    if _has_bad_utf8(text):
        return RawRecord(source, number, None, raw=_readable(text), error="invalid UTF-8")
    try:
        obj = jsonio.loads(text)
    except json.JSONDecodeError as e:
        return RawRecord(source, number, None, raw=text, error=f"not JSON: {e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        return RawRecord(source, number, None, raw=text, error=f"expected a JSON object, got {type(obj).__name__}")
    return RawRecord(source, number, obj)


def _iter_jsonl(path: Path) -> Iterator[RawRecord]:
    source = str(path)
    with TextFile(path) as f:
        for number, text in jsonl_lines(f):
            yield parse_jsonl_line(source, number, text)
        if f.error is not None:
            yield truncation_record(source, f.error, f.error_line, f.partial)


def _iter_json(path: Path) -> Iterator[RawRecord]:
    """Stream the elements of a top-level JSON array (constant memory); ``{"data": [...]}`` is read whole."""
    with TextFile(path) as f:
        head = f.read(1 << 16)
        stripped = head.lstrip()
        if stripped.startswith("["):
            before = head[: len(head) - len(stripped) + 1]          # the blanks and the "["
            line = 1 + before.count("\n")
            yield from _iter_json_array(path, f, stripped[1:], line=line, column=len(before) - before.rfind("\n"))
            return
        text = head + f.read()
        if f.error is not None:
            yield truncation_record(str(path), f.error, 1, text[:10000])
            return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFileError(
            f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); a .json file must hold one array of records "
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


class _Reader(Protocol):
    def read(self, n: int = -1, /) -> str: ...


class _Position:
    """Line and column (1-based, lines split at ``\\n``) where the text a streaming parser holds starts."""

    def __init__(self, line: int, column: int):
        self.line, self.column = line, column

    def of(self, text: str, pos: int) -> tuple[int, int]:
        """Line and column of ``text[pos]``, ``text`` starting here."""
        newlines = text.count("\n", 0, pos)
        return self.line + newlines, pos - text.rfind("\n", 0, pos) if newlines else self.column + pos

    def at(self, text: str, pos: int) -> str:
        return "{}:{}".format(*self.of(text, pos))

    def advance(self, text: str, pos: int) -> None:
        """Move past ``text[:pos]``."""
        self.line, self.column = self.of(text, pos)


def _iter_json_array(path: Path, f: _Reader, buffer: str, chunk: int = 1 << 20, line: int = 1,
                     column: int = 1) -> Iterator[RawRecord]:
    """Decode one array element at a time with ``raw_decode``, reading ``chunk`` characters as needed.

    ``buffer`` starts at ``line``:``column`` of the file (for the position in error messages). Where the file's
    compressed stream broke off (``f.error``) the element there is a :func:`truncation_record`; a plain file that
    ends inside the array is a :class:`DataFileError` naming the line and column."""
    decoder = json.JSONDecoder()
    index, pos, eof = 0, 0, False
    where = _Position(line, column)                     # of buffer[0]
    while True:
        while pos < len(buffer) and buffer[pos] in " \t\r\n,":
            pos += 1
        if pos < len(buffer) and buffer[pos] == "]":
            return
        if pos >= len(buffer):
            if eof:
                if error := getattr(f, "error", None):
                    yield truncation_record(str(path), error, index + 1, "")
                    return
                raise DataFileError(f"{path}:{where.at(buffer, pos)}: the JSON array is not closed with ']' "
                                    "(file truncated?)")
            where.advance(buffer, pos)
            buffer, pos = buffer[pos:] + f.read(chunk), 0
            eof = eof or len(buffer) == 0
            continue
        try:
            item, end = decoder.raw_decode(buffer, pos)
        except json.JSONDecodeError as e:
            if not eof:  # the element may continue in the next chunk
                more = f.read(chunk)
                eof = not more
                where.advance(buffer, pos)
                buffer, pos = buffer[pos:] + more, 0
                continue
            if error := getattr(f, "error", None):
                yield truncation_record(str(path), error, index + 1, buffer[pos:pos + 10000])
                return
            problem = e.msg.removesuffix(" at").removesuffix(" starting")     # json's message, without position
            raise DataFileError(f"{path}:{where.at(buffer, e.pos)}: element {index + 1} of the array is not valid "
                                f"JSON ({problem}; file truncated?); a .json file must hold one array of records"
                                ) from e
        if end == len(buffer) and not eof:  # a number may be cut at the chunk edge: read on and decode again
            more = f.read(chunk)
            if more:
                where.advance(buffer, pos)
                buffer, pos = buffer[pos:] + more, 0
                continue
            eof = True
        index += 1
        yield _json_item(path, index, item)
        pos = end
        if pos > chunk:
            where.advance(buffer, pos)
            buffer, pos = buffer[pos:], 0


def _csv_error(e: csv.Error) -> str:
    if "new-line character seen in unquoted field" in str(e):
        return "CSV error: a carriage return (\\r) inside an unquoted field; quote the field or remove the \\r"
    return f"CSV error: {e}"


def _iter_csv(path: Path) -> Iterator[RawRecord]:
    """Rows as records, each at the line it ends on. Lines split at ``\\n`` only: a lone ``\\r`` in a quoted field
    is text, in an unquoted one a CSV error. A row the broken stream of a ``.csv.gz`` cut short is not a record:
    its lines are the text of the :func:`truncation_record`."""
    source = str(path)
    with TextFile(path) as f:
        row_lines: list[str] = []               # the lines of the row being read (the text of its reject)
        ended = False                           # every line was handed to the csv reader

        def lines() -> Iterator[str]:
            nonlocal ended
            for _, text in f.lines(keepends=True):
                row_lines.append(text)
                yield text
            ended = True

        reader = csv.DictReader(lines())
        try:
            header = reader.fieldnames
        except csv.Error as e:
            raise DataFileError(f"{path}:{reader.line_num}: the CSV header cannot be read ({_csv_error(e)})") from e
        if header is not None:
            row_lines.clear()
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:                  # (DictReader.line_num is not updated on an error)
                    yield RawRecord(source, reader.reader.line_num, None, raw=_readable("".join(row_lines)),
                                    error=_csv_error(e))
                    row_lines.clear()
                    continue
                if ended and f.error is not None:       # the stream broke off inside this row
                    break
                row_lines.clear()
                extra = row.pop(None, None)
                if extra:
                    yield RawRecord(source, reader.line_num, None, raw=json.dumps(list(row.values()) + extra),
                                    error=f"row has {len(extra)} more fields than the header")
                    continue
                yield RawRecord(source, reader.line_num, dict(row))
        if f.error is not None:
            yield truncation_record(source, f.error, f.error_line, "".join(row_lines) + f.partial)


def _iter_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            index += 1
            yield RawRecord(str(path), index, row)
