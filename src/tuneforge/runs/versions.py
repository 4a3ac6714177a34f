"""What a run was made with, for ``run.json`` and ``tuneforge.json``: the library versions and the data files'
sha256."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

from tuneforge.runs.records import DataFile

LIBRARIES = ("tuneforge", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers")


def library_versions() -> dict[str, str]:
    """Python, the platform and the installed version of each of :data:`LIBRARIES` (those not installed left out)."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def data_fingerprints(paths: list[str | None]) -> list[DataFile]:
    """``path`` and ``sha256`` of each data file given (None, for a run without validation file, is skipped); a
    folder (a mixture's source) by :func:`tuneforge.data.loaders.data_sha256`."""

    from tuneforge.data.loaders import data_sha256

    return [DataFile(path=p, sha256=data_sha256(p)) for p in paths if p]
