"""The run directory: its layout, its typed and versioned records, the base model it needs, and loading it.

Every stage reads and writes a run (and a package) through this package, never a dict by string keys:

- ``layout.py``: :class:`RunDir`, the path of each file (``config.yaml``, ``run.json``, ``metrics.jsonl``,
  ``checkpoints/``, ``eval/report.json``, ``tuneforge.json``, ...);
- ``records.py``: :class:`RunRecord` (``run.json``), :class:`PackageManifest` (``tuneforge.json``),
  :class:`EvalReport` (``eval/report.json``), :class:`PipelineState` (``pipeline/state.json``), each with a
  ``schema_version``; files of older tuneforge
  (no ``schema_version``) read as version 1, unknown keys kept, newer versions refused in one line;
- ``base_model.py``: :func:`base_model_sha256`, :func:`base_model_record`, :func:`verify_base_model`;
- ``versions.py``: :func:`library_versions`, :func:`data_fingerprints`;
- ``loading.py``: :func:`load_run`, :func:`load_base`, :class:`LoadedModel` (imported when asked for: they
  pull in torch, the rest does not);
- ``errors.py``: :class:`NotARunError`, :class:`NewerSchemaError`.

``runs`` stands below the stages (training, evaluation, export, serving) and imports none of them.
"""

from __future__ import annotations

from typing import Any

from tuneforge.runs.base_model import (
    BaseModelMismatch,
    base_model_record,
    base_model_sha256,
    run_trusts_remote_code,
    verify_base_model,
)
from tuneforge.runs.errors import NewerSchemaError, NotARunError
from tuneforge.runs.layout import RunDir
from tuneforge.runs.records import (
    SCHEMA_VERSION,
    BaseModelRecord,
    DataFile,
    EvalReport,
    ExampleCounts,
    PackageManifest,
    PipelineState,
    RunRecord,
    StageRecord,
    TemplateRecord,
)
from tuneforge.runs.versions import data_fingerprints, library_versions

_LOADING = ("LoadedModel", "load_base", "load_run")

__all__ = ["SCHEMA_VERSION", "BaseModelMismatch", "BaseModelRecord", "DataFile", "EvalReport", "ExampleCounts",
           "NewerSchemaError", "NotARunError", "PackageManifest", "PipelineState", "RunDir", "RunRecord", "StageRecord",
           "TemplateRecord",
           "base_model_record", "base_model_sha256", "data_fingerprints", "library_versions", "run_trusts_remote_code",
           "verify_base_model",
           *_LOADING]


def __getattr__(name: str) -> Any:      # loading pulls in torch and transformers: import it only when asked for
    if name in _LOADING:
        from tuneforge.runs import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'tuneforge.runs' has no attribute {name!r}")
