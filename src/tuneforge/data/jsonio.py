"""JSON lines in and out, fast: orjson where it gives the same result as the standard library, json otherwise.

Parsing and serialising are a third of the per-record work of ``tuneforge data clean``; orjson does both
several times faster. Where the two differ orjson refuses (``NaN``/``Infinity``, lone surrogates,
non-string keys) or, for integers beyond 64 bits, would silently return a float: lines with a run of 19
or more digits go to :mod:`json` directly. So the parsed values and the error messages are exactly
those of :mod:`json` (tested).
"""

from __future__ import annotations

import json
import re
from typing import Any

try:
    import orjson
except ImportError:          # optional speed-up: everything works with the standard library alone
    orjson = None


_LONG_NUMBER = re.compile(r"\d{19}")      # may not fit in 64 bits: orjson would return a float


def loads(text: str) -> Any:
    """``json.loads(text)``; raises :class:`json.JSONDecodeError` with json's message on bad input."""
    if orjson is not None and _LONG_NUMBER.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


def dumps(obj: Any) -> str:
    """Compact UTF-8 JSON text of ``obj`` (not ASCII-escaped); raises ``UnicodeEncodeError`` on lone surrogates."""
    if orjson is not None:
        try:
            return orjson.dumps(obj).decode("utf-8")
        except TypeError:                     # orjson.JSONEncodeError: surrogates, big ints, odd keys
            pass
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    text.encode("utf-8")
    return text


def dumps_record(obj: Any) -> str:
    """JSON text of a record written back out verbatim (to ``rejects.jsonl``, split files, spools).

    UTF-8, not ASCII-escaped, unless a text holds a lone surrogate: then the whole record is written
    ASCII-escaped, keeping the surrogate, so the line is still valid JSON. Values JSON cannot hold
    (dates from parquet, ...) are written with ``str``.
    """
    try:
        text = json.dumps(obj, ensure_ascii=False, default=str)
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, default=str)
