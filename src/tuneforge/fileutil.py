"""Two helpers every part of tuneforge shares: the cache folder and the SHA-256 of a file.

* :func:`cache_dir`: ``$TUNEFORGE_CACHE`` or ``~/.cache/tuneforge``. Converted models live under
  ``models/``, tokenized data under ``tokenized/``.
* :func:`file_sha256`: the hex SHA-256 of a file's bytes, read in 1 MiB blocks (constant memory). The
  result is remembered for the life of the process, keyed by (resolved path, size, modification time
  in ns), so a run that fingerprints its data for ``run.json`` and again for the token cache reads
  each file once; a file that changes gets a new key and is hashed again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_BLOCK = 1 << 20
_hashes: dict[tuple[str, int, int], str] = {}


def cache_dir() -> Path:
    """``$TUNEFORGE_CACHE`` or ``~/.cache/tuneforge`` (a leading ``~`` in the variable is expanded)."""
    return Path(os.environ.get("TUNEFORGE_CACHE") or Path.home() / ".cache" / "tuneforge").expanduser()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the bytes of ``path``; memoised per (resolved path, size, mtime_ns)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    digest = _hashes.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
        digest = _hashes[key] = h.hexdigest()
    return digest
