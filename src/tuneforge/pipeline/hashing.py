"""The hashes a pipeline stage records: of files, of folders, and of settings.

``path_sha256(path)``: a file's sha256 (:func:`tuneforge.fileutil.file_sha256`, memoised per size and mtime); a
folder's: the sha256 of its files' relative paths and sha256s, sorted; a missing path: ``"missing"``.
``json_sha256(value)``: the sha256 of ``value`` as canonical JSON (sorted keys), for a config section.
``combined(hashes)``: one sha256 for a ``{name: sha256}`` mapping (an upstream stage's outputs as one input).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tuneforge.fileutil import file_sha256

MISSING = "missing"


def path_sha256(path: str | os.PathLike) -> str:
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(p).as_posix()}\0{file_sha256(f)}\n".encode())
        return h.hexdigest()
    return MISSING


def json_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def combined(hashes: dict[str, str]) -> str:
    return json_sha256(hashes)
