"""Where each file of a run directory (and of a package) lives: one name per file, one class for the paths.

A run directory is what ``tuneforge train`` writes under ``output_dir`` (docs/ARCHITECTURE.md, "The run
directory"); a package is what ``tuneforge package`` writes (the run's trained files, ``config.yaml``,
``README.md`` and the manifest ``tuneforge.json``). Every stage asks :class:`RunDir` for a path instead of
spelling the file name.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG = "config.yaml"              # the resolved run config (every key, defaults included)
RUN_RECORD = "run.json"             # what produced the run: :class:`tuneforge.runs.records.RunRecord`
METRICS = "metrics.jsonl"           # one row per logged step
REJECTS = "rejects.jsonl"           # records that were not used
LOSS_CURVE = "loss_curve.png"
CHECKPOINTS = "checkpoints"
TRACKING = "tracking"
EVAL = "eval"                       # tuneforge eval's folder: report.md, report.json, report.html
REPORT = "report.json"              # the evaluation report: :class:`tuneforge.runs.records.EvalReport`
EXPORT = "export"                   # tuneforge export without --out
PIPELINE = "pipeline"                # tuneforge pipeline's folder: state.json, summary.md, summary.json, curated/
PIPELINE_STATE = "state.json"       # :class:`tuneforge.runs.records.PipelineState`
MANIFEST = "tuneforge.json"         # a package's manifest: :class:`tuneforge.runs.records.PackageManifest`
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"   # every adapter method's trained tensors (peft's name)
MODEL_CONFIG = "config.json"        # a full model's transformers config


class RunDir:
    """The paths of one run directory (or package folder); nothing is read or created by building one.

    >>> RunDir("runs/quickstart").report
    PosixPath('runs/quickstart/eval/report.json')
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def record(self) -> Path:
        """``run.json``."""
        return self.path / RUN_RECORD

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def rejects(self) -> Path:
        return self.path / REJECTS

    @property
    def loss_curve(self) -> Path:
        return self.path / LOSS_CURVE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def tracking(self) -> Path:
        return self.path / TRACKING

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL

    @property
    def report(self) -> Path:
        """``eval/report.json``."""
        return self.path / EVAL / REPORT

    @property
    def export_dir(self) -> Path:
        return self.path / EXPORT

    @property
    def pipeline_dir(self) -> Path:
        return self.path / PIPELINE

    @property
    def pipeline_state(self) -> Path:
        """``pipeline/state.json``: what each stage of ``tuneforge pipeline`` read, wrote and decided."""
        return self.path / PIPELINE / PIPELINE_STATE

    @property
    def manifest(self) -> Path:
        """``tuneforge.json``: present in a package, absent in a run directory."""
        return self.path / MANIFEST

    @property
    def adapter_config(self) -> Path:
        return self.path / ADAPTER_CONFIG

    @property
    def adapter_weights(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    @property
    def model_config(self) -> Path:
        return self.path / MODEL_CONFIG

    @property
    def is_package(self) -> bool:
        return self.manifest.is_file()
