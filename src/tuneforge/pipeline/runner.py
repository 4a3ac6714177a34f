"""``tuneforge pipeline``: run the stages of the run config's ``pipeline:`` section in order, skipping those whose
inputs did not change, stopping at a failed gate.

A stage is skipped when it is not forced, its record in ``pipeline/state.json`` says it finished, its inputs'
hashes (config section, data files' contents, upstream outputs) equal the recorded ones, and its outputs are still
on disk with their recorded hashes (as make or DVC decide). Otherwise it runs and its record is replaced. A
stage that raises leaves the earlier stages' outputs and records, is recorded ``failed`` and stops the run
(:class:`~tuneforge.pipeline.errors.StageFailed`). After the gates stage (run or skipped), a failed gate that was
not accepted stops the run before package (:class:`~tuneforge.pipeline.errors.GateFailed`); an acceptance
(``accept={gate: reason}``) is recorded with the gate and holds while the gates' inputs stay the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tuneforge.config import RunConfig
from tuneforge.config.pipeline import GATES, STAGES, PipelineSettings
from tuneforge.errors import ConfigError
from tuneforge.pipeline.errors import GateFailed, StageFailed
from tuneforge.pipeline.gates import GateResult
from tuneforge.pipeline.hashing import path_sha256
from tuneforge.pipeline.stages import STAGE_TABLE, Context, Stage, outputs_sha256, where
from tuneforge.pipeline.summary import StageRow, add_to_report_html, table, write_summary
from tuneforge.runs import PipelineState, RunDir, StageRecord

log = logging.getLogger(__name__)

FAILURE_CATEGORIES = ("empty", "repetition_loop", "refusal", "echoed_prompt", "never_stopped", "format_broken",
                      "wrong_label", "wrong_answer")


@dataclass
class PipelineResult:
    """What one pipeline run did: each stage's row, the gates' results, where the summary is."""

    run_dir: Path
    stages: list[StageRow]
    gates: list[GateResult]
    summary_md: Path
    summary_json: Path

    def table(self) -> str:
        return table(self.stages, self.gates, self.run_dir)


def check_pipeline(config: RunConfig, settings: PipelineSettings, from_stage: str | None, until: str | None,
                   force: Iterable[str], accept: dict[str, str]) -> None:
    """Refuse, before any stage runs, what cannot work: a --from/--until/--force stage not configured, an
    --accept-gate for a gate not configured or without a reason, a gate that needs an eval setting not set."""
    stages = settings.stages
    for flag, names in (("--from", [from_stage]), ("--until", [until]), ("--force", list(force))):
        for name in names:
            if name is not None and name not in stages:
                raise ConfigError(f"{flag} {name}: not a stage of this pipeline (pipeline.stages: {', '.join(stages)}"
                                  f"; every stage: {', '.join(STAGES)})")
    if from_stage and until and stages.index(from_stage) > stages.index(until):
        raise ConfigError(f"--from {from_stage} comes after --until {until}")
    gates = settings.gates
    configured = [g for g in GATES if getattr(gates, g) is not None]
    for name, reason in accept.items():
        if name not in configured:
            raise ConfigError(f"--accept-gate {name}: not a configured gate (pipeline.gates: "
                              f"{', '.join(configured) or 'none'})")
        if not reason or not reason.strip():
            raise ConfigError(f"--accept-gate {name}: give the reason with --reason TEXT (it is recorded)")
    if "gates" not in stages:
        return
    columns = config.eval.columns if config.eval else ["base", "tuned"]
    extra = list(config.eval.extra) if config.eval else []
    if gates.beats_baselines:
        missing = [c for c in ["tuned", *gates.beats_baselines.against] if c not in columns]
        if missing:
            raise ConfigError(f"pipeline.gates.beats_baselines compares {', '.join(missing)}, not in eval.columns "
                              f"({', '.join(columns)}): add them to eval.columns")
    if gates.forgetting and not (config.eval and config.eval.forgetting.enabled):
        raise ConfigError("pipeline.gates.forgetting needs the forgetting check: set eval.forgetting.enabled: true "
                          "and eval.forgetting.data (the MMLU folder)")
    if gates.failures:
        unknown = [c for c in gates.failures.caps if c not in FAILURE_CATEGORIES]
        if unknown:
            raise ConfigError(f"pipeline.gates.failures.caps: unknown category {', '.join(unknown)}; choose from "
                              f"{', '.join(FAILURE_CATEGORIES)}")
    for key, gate in (("failures", gates.failures), ("min_score", gates.min_score),
                      ("beats_baselines", gates.beats_baselines)):
        if gate is not None and gate.set != "test" and gate.set not in extra:
            raise ConfigError(f"pipeline.gates.{key}.set: {gate.set!r} is neither test nor a name of eval.extra "
                              f"({', '.join(extra) or 'none'})")
        if gate is not None and getattr(gate, "column", "tuned") not in columns:
            raise ConfigError(f"pipeline.gates.{key}.column: {gate.column!r} is not in eval.columns "  # type: ignore
                              f"({', '.join(columns)})")


def _fresh(stage: Stage, ctx: Context, record: StageRecord | None, inputs: dict[str, str]) -> bool:
    if not stage.cached or record is None or record.status != "ok" or record.inputs != inputs:
        return False
    return all(path_sha256(where(ctx, p)) == h for p, h in (record.outputs or {}).items())


def run_pipeline(config: RunConfig, from_stage: str | None = None, until: str | None = None,
                 force: Iterable[str] = (), accept: dict[str, str] | None = None,
                 echo: Callable[[str], None] = print) -> PipelineResult:
    """Run the configured stages (see the module docstring); return what ran, the gates and the summary's paths.

    ``from_stage``: run this stage and every later one, skipping none; the earlier ones do not run (their outputs
    on disk feed the later ones). ``until``: stop after this stage. ``force``: run these stages even when their
    inputs did not change. ``accept``: {gate: reason} for failed gates to let through. ``echo``: where the
    one-line progress of each stage goes.

    Raises :class:`~tuneforge.errors.ConfigError` before anything runs for a setting that cannot work,
    :class:`StageFailed` when a stage fails and :class:`GateFailed` when a gate fails (the summary is written in
    every case).
    """
    settings = config.pipeline or PipelineSettings.model_validate({})
    accept = dict(accept or {})
    force = set(force)
    check_pipeline(config, settings, from_stage, until, force, accept)
    run = RunDir(config.output_dir)
    run.pipeline_dir.mkdir(parents=True, exist_ok=True)
    state = PipelineState.load(run.path) or PipelineState(tuneforge_pipeline=1, stages={})
    records: dict[str, StageRecord] = dict(state.stages or {})
    ctx = Context(config, settings, run)
    selected = settings.stages
    start = selected.index(from_stage) if from_stage else 0
    stop = selected.index(until) if until else len(selected) - 1
    rows: list[StageRow] = []
    gates: list[GateResult] = []
    stopped: str | None = None

    def save() -> tuple[Path, Path]:
        if stopped:         # the stages a stop left out are listed too
            done = {r.name for r in rows}
            rows.extend(StageRow(n, "not run") for n in selected if n not in done)
        state.stages = records
        state.save(run.path)
        add_to_report_html(run.eval_dir, rows, gates, run.path, stopped)
        return write_summary(run.pipeline_dir, rows, gates, run.path, stopped)

    for i, name in enumerate(selected):
        stage = STAGE_TABLE[name]
        if i < start or i > stop or stopped:
            rows.append(StageRow(name, "not run"))
            continue
        inputs = stage.inputs(ctx)
        record = records.get(name)
        forced = name in force or (from_stage is not None and i >= start)
        if not forced and _fresh(stage, ctx, record, inputs):
            assert record is not None
            rows.append(StageRow(name, "skipped", 0.0, "inputs unchanged", inputs, dict(record.outputs or {})))
            if name == "gates":
                gates = [GateResult.from_dict(g) for g in record.gates or []]
            echo(f"[{name}] skipped: inputs unchanged")
        else:
            echo(f"[{name}] running")
            began = time.time()
            try:
                note = stage.run(ctx)
            except KeyboardInterrupt:
                raise
            except Exception as e:      # any stage's error: recorded, one line, earlier outputs kept
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                records[name] = StageRecord(status="failed", inputs=inputs, outputs={}, error=reason,
                                            seconds=round(time.time() - began, 3), finished=time.time())
                rows.append(StageRow(name, "failed", time.time() - began, reason, inputs))
                stopped = f"stage {name} failed"
                save()
                raise StageFailed(name, reason, str(run.path)) from e
            seconds = time.time() - began
            outputs = outputs_sha256(stage, ctx)
            if name == "gates":
                gates = ctx.gate_results
            records[name] = StageRecord(status="ok", inputs=inputs, outputs=outputs, seconds=round(seconds, 3),
                                        finished=time.time(),
                                        gates=[g.to_dict() for g in gates] if name == "gates" else None)
            rows.append(StageRow(name, "ran", seconds, note, inputs, outputs))
            echo(f"[{name}] {note} ({seconds:.1f} s)")
        if name == "gates":
            for g in gates:
                if not g.passed and g.name in accept:
                    g.accepted = accept[g.name]
                    log.warning("gate %s failed and was accepted: %s", g.name, g.accepted)
            records[name].gates = [g.to_dict() for g in gates]
            failed = [g for g in gates if not g.passed and not g.accepted]
            if failed:
                stopped = f"gate {failed[0].name} failed"
                save()
                raise GateFailed(failed[0].name, failed[0].detail, str(run.eval_dir / "report.html"))
        save()
    js, md = save()
    return PipelineResult(run.path, rows, gates, md, js)
