"""``run.json``: what produced a run (base model and its hash, data and their hashes, versions, seed, time)."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

from tuneforge.fileutil import file_sha256
from tuneforge.models.registry import model_fingerprint


def library_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("tuneforge", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def data_fingerprints(paths: list[str | None]) -> list[dict]:
    return [{"path": p, "sha256": file_sha256(p)} for p in paths if p]


def base_model_record(spec: str, path) -> dict:
    return {"spec": spec, "path": str(path), **model_fingerprint(path)}
