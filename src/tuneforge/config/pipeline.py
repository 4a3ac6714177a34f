"""The run config's ``pipeline:`` section: which stages ``tuneforge pipeline`` runs, their settings, the gates.

The stages, in their fixed order: ``curate -> train -> evaluate -> gates -> package -> export -> serve``
(:data:`STAGES`); ``stages:`` picks some of them (kept in that order). Each gate is a named check with a
threshold; a gate left unset (null) is not checked. The stages themselves live in their own packages; the
pipeline that chains them is :mod:`tuneforge.pipeline`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from tuneforge.schema import Settings

STAGES = ("curate", "train", "evaluate", "gates", "package", "export", "serve")
DEFAULT_STAGES = ["curate", "train", "evaluate", "gates", "package"]


class CurateStage(Settings):
    """``tuneforge data clean`` on ``data.train`` (checked against ``data.validation`` and ``eval.data`` for
    leakage); training then reads the clean file."""
    settings: dict[str, Any] = Field({}, description="curation settings, the keys of a `tuneforge data clean "
                                                     "--config` file (max_length, near_dup_threshold, actions, ...)")


class PackageStage(Settings):
    """``tuneforge package`` of the run."""
    out: str | None = Field(None, description="package folder; default: <output_dir>/package")
    license: str | None = Field(None, description="the card's license (default: the base model's)")
    intended_use: str | None = Field(None, description="a paragraph for the card's 'Intended use'")


class ExportStage(Settings):
    """``tuneforge export`` of the package (or the run when package is not a stage)."""
    format: str = Field("gguf", description="gguf (the merged model) or gguf-lora (the LoRA adapter alone)")
    quant: str = Field("f16", description="gguf: weight type of the 2-D tensors (f16, q8_0, q4_0)")
    out: str | None = Field(None, description="GGUF file; default: <output_dir>/export/<name>-<quant>.gguf")
    check: bool = Field(True, description="load the file back and compare with the merged model")

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in ("gguf", "gguf-lora"):
            raise ValueError(f"unknown export format {v!r}; choose gguf or gguf-lora")
        return v


class ServeStage(Settings):
    """``tuneforge serve`` of the package (or the run): runs until stopped (Ctrl-C), so it is the last stage."""
    name: str = Field("tuned", description="the adapter's model id in /v1/models")
    host: str = Field("127.0.0.1", description="address to listen on (loopback only: serve without the pipeline "
                                               "for another host, with --api-key)")
    port: int = Field(8000, ge=1, le=65535)

    @field_validator("host")
    @classmethod
    def _loopback(cls, v: str) -> str:
        if v not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"{v!r}: the pipeline serves on this machine only (127.0.0.1, localhost or ::1); for "
                             "another host run `tuneforge serve --host ... --api-key ...` on the package")
        return v


class BeatsBaselinesGate(Settings):
    """The tuned column beats each baseline on the main metric: paired bootstrap over the same prompts, the share
    of resamples where tuned does not win (``p_not_better``) at most ``max_p_not_better``."""
    against: list[str] = Field(["fewshot", "rag"], description="baseline columns (each must be in eval.columns)")
    set: str = Field("test", description="the test set compared on (test, or a name of eval.extra)")
    max_p_not_better: float = Field(0.05, gt=0, lt=1, description="the level: largest share of resamples where "
                                                                  "tuned - baseline <= 0")
    resamples: int = Field(1000, ge=100, description="bootstrap resamples")
    seed: int = Field(0, description="seeds the resampling")


class ForgettingGate(Settings):
    """MMLU accuracy drop (base - tuned) at most ``max_drop``; needs eval.forgetting.enabled."""
    max_drop: float | None = Field(None, ge=0, le=1, description="default: eval.forgetting.max_drop")


class FailuresGate(Settings):
    """Failure categories of a column under caps, each a share of the set's examples (0-1)."""
    column: str = Field("tuned", description="the column checked")
    set: str = Field("test", description="the test set checked")
    caps: dict[str, float] = Field({"refusal": 0.05, "never_stopped": 0.05},
                                   description="category -> largest share of the examples (empty, repetition_loop, "
                                               "refusal, echoed_prompt, never_stopped, format_broken, wrong_label, "
                                               "wrong_answer)")

    @field_validator("caps")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, x in v.items() if not 0 <= x <= 1]
        if bad:
            raise ValueError(f"caps are shares of the examples, 0 to 1: {', '.join(bad)}")
        return v


class MinScoreGate(Settings):
    """The tuned column's main metric on one set (e.g. the hand-written one) at least ``min``."""
    set: str = Field("handwritten", description="the test set (test, or a name of eval.extra)")
    column: str = Field("tuned", description="the column checked")
    min: float = Field(0.5, ge=0, description="the smallest main-metric value accepted (0-1 for accuracies)")


class LossGate(Settings):
    """Training did not diverge: run.json's status is not ``regressed``, every logged loss is finite, and the
    final training loss is at most ``max_final_over_first`` x the first logged one."""
    max_final_over_first: float = Field(1.0, gt=0, description="final / first training loss at most this")


class Gates(Settings):
    """The checks between evaluate and package; a gate set to null is not checked."""
    beats_baselines: BeatsBaselinesGate | None = None
    forgetting: ForgettingGate | None = None
    failures: FailuresGate | None = None
    min_score: MinScoreGate | None = None
    loss: LossGate | None = Field(default_factory=lambda: LossGate.model_validate({}))


GATES = tuple(Gates.model_fields)


class PipelineSettings(Settings):
    """What ``tuneforge pipeline`` runs (docs/guides/pipeline.md)."""
    stages: list[str] = Field(DEFAULT_STAGES, description="the stages to run, of curate, train, evaluate, gates, "
                                                          "package, export, serve (run in that order)")
    curate: CurateStage = CurateStage.model_validate({})
    package: PackageStage = PackageStage.model_validate({})
    export: ExportStage = ExportStage.model_validate({})
    serve: ServeStage = ServeStage.model_validate({})
    gates: Gates = Gates.model_validate({})

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
        if not v:
            raise ValueError("no stage: list at least one of " + ", ".join(STAGES))
        return [s for s in STAGES if s in v]
