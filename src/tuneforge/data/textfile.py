"""A data file opened as text: plain or gzipped, lines as editors number them, a broken stream reported, not raised.

* Lines end at ``\\n`` only: ``\\r\\n`` is one break, a lone ``\\r`` is part of the line's text (as editors show
  it; Python's universal newlines would break the line there, and every line number after it would be off).
* Bytes that are not UTF-8 are kept as lone surrogates (``surrogateescape``) for the caller to reject.
* A truncated or corrupt compressed stream (``.gz``) ends the text instead of raising: everything decoded before
  it is read, then :attr:`TextFile.error` says what happened (starting with :data:`TRUNCATED`),
  :attr:`TextFile.error_line` at which line and :attr:`TextFile.partial` holds that line's incomplete text.
"""

from __future__ import annotations

import codecs
import gzip
import io
import zlib
from pathlib import Path
from typing import Iterator

COMPRESSED_SUFFIXES = (".gz",)
TRUNCATED = "file is truncated / corrupt compressed stream"
_STREAM_ERRORS = (zlib.error, gzip.BadGzipFile)   # what a garbled .gz raises mid-read (a cut one: EOFError)
_BLOCK = 1 << 20


def is_compressed(path: str | Path) -> bool:
    return str(path).lower().endswith(COMPRESSED_SUFFIXES)


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


class TextFile:
    """Read ``path`` once, as lines (:meth:`lines`) or as characters (:meth:`read`); see the module docstring."""

    def __init__(self, path: str | Path, block: int = _BLOCK):
        self.path = Path(path)
        self.block = block
        self._f: gzip.GzipFile | io.BufferedReader = (gzip.GzipFile(self.path, "rb") if is_compressed(path)
                                                      else open(self.path, "rb"))
        self.error: str | None = None
        self.error_line = 0
        self.partial = ""
        self._blocks: Iterator[bytes] | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._text = ""

    def __enter__(self) -> TextFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def blocks(self) -> Iterator[bytes]:
        """The (decompressed) bytes block by block, up to the end or the first stream error (then ``error`` is set).

        ``read1`` hands out what the decompressor produced before it fails, so nothing readable is dropped."""
        while True:
            try:
                block = self._f.read1(self.block)
            except EOFError as e:
                self.error = f"{TRUNCATED}: {e}"
                return
            except _STREAM_ERRORS as e:             # deflate decodes garbage for a while before it notices
                self.error = f"{TRUNCATED}: {e} (corrupt data: the records just before this point may be garbled)"
                return
            if not block:
                return
            yield block

    def lines(self, keepends: bool = False) -> Iterator[tuple[int, str]]:
        """``(number, text)`` of every line, blank ones too, numbered from 1 as editors number them. ``text`` is
        without its ``\\n`` / ``\\r\\n`` unless ``keepends``. After a stream error the incomplete last line is not
        yielded: it is :attr:`partial`, at :attr:`error_line`."""
        number, tail = 0, []
        for block in self.blocks():
            cut = block.rfind(b"\n")
            if cut < 0:
                tail.append(block)
                continue
            tail.append(block[:cut])
            text = _decode(b"".join(tail))
            tail = [block[cut + 1:]]
            lines = text.split("\n")
            if keepends:
                lines = [line + "\n" for line in lines]
            elif "\r" in text:
                lines = [line[:-1] if line.endswith("\r") else line for line in lines]
            yield from zip(range(number + 1, number + 1 + len(lines)), lines, strict=True)
            number += len(lines)
        rest = _decode(b"".join(tail))
        if self.error is not None:
            self.error_line, self.partial = number + 1, rest
        elif rest:                                  # a last line without a line break (a lone \r stays)
            yield number + 1, rest

    def read(self, n: int = -1) -> str:
        """Up to ``n`` characters (all that is left for ``n < 0``); fewer only at the end, ``""`` there."""
        if self._blocks is None:
            self._blocks = self.blocks()
        while n < 0 or len(self._text) < n:
            block = next(self._blocks, None)
            if block is None:
                self._text += self._decoder.decode(b"", final=True)
                break
            self._text += self._decoder.decode(block)
        if n < 0:
            n = len(self._text)
        out, self._text = self._text[:n], self._text[n:]
        return out
