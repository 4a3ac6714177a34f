"""Export a trained run: merge adapters into the base weights, package runs, write GGUF files.

The names below are imported lazily (PEP 562), so importing ``tuneforge.export`` does not pull in torch. The
base-model check and the errors live in :mod:`tuneforge.runs` (stages import them from there); they are
importable from here as before.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "MergeCheckError": "tuneforge.export.merge", "MergeReport": "tuneforge.export.merge",
    "merge_adapter": "tuneforge.export.merge", "merge_run": "tuneforge.export.merge",
    "verify_merge": "tuneforge.export.merge",
    "BaseModelMismatch": "tuneforge.runs.base_model", "NotARunError": "tuneforge.runs.errors",
    "PackageReport": "tuneforge.export.package", "package_run": "tuneforge.export.package",
    "verify_base_model": "tuneforge.runs.base_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tuneforge.export' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
