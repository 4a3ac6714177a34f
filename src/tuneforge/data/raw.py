"""The record a loader reads (:class:`RawRecord`) and the data file types (:func:`data_suffix`).

Apart from :mod:`tuneforge.data.loaders` (which reads files) so that :mod:`tuneforge.data.sources` (which reads
folders and ``datasets``) can use them while the loaders hand every path that is not a file to the sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.data.errors import DataFileError
from tuneforge.data.textfile import COMPRESSED_SUFFIXES

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


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


def data_suffix(path: str | Path) -> str:
    name = str(path).lower()
    compressed = name.endswith(COMPRESSED_SUFFIXES)
    if compressed:
        name = name[: name.rindex(".")]
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            if compressed and suffix == ".parquet":
                raise DataFileError(f"{path}: parquet compresses its columns itself; give the .parquet file as it is")
            return suffix
    raise DataFileError(
        f"{path}: unsupported data file type; use one of {', '.join(SUPPORTED_SUFFIXES)} (optionally .gz)"
    )
