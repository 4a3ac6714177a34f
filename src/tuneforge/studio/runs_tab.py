"""The Runs tab: every run directory under a folder with its status, method, data, best score and time.

Status comes from the run directory's files alone: ``running`` (its ``studio.pid`` process is alive),
``finished`` (``run.json`` written; ``finished (regressed)`` when the run ended worse than it started),
``stopped`` (no process, no ``run.json``, a ``last`` checkpoint that ``Resume`` continues) or ``failed`` (none of
these; ``studio.log`` says why). A run directory is a folder with ``config.yaml`` or ``metrics.jsonl``; a package
(``tuneforge.json``, what the Ship tab's Package writes beside the run) and a hidden folder (the server's ``.serve``)
are not runs.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from tuneforge.runs.errors import NotARunError
from tuneforge.runs.layout import RunDir
from tuneforge.runs.records import EvalReport, RunRecord
from tuneforge.studio import process

COLUMNS = ["run", "status", "method", "data", "steps", "best score", "time", "gates"]


@dataclass
class RunSummary:
    """One row of the Runs tab."""

    path: Path
    status: str
    method: str = ""
    data: str = ""
    steps: int | None = None
    best_score: str = ""
    time_s: float | None = None
    gates: str = ""
    modified: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> list[Any]:
        shown_time = "" if self.time_s is None else f"{self.time_s:.0f} s"
        return [self.path.name, self.status, self.method, self.data, self.steps, self.best_score, shown_time,
                self.gates]


def is_run_dir(path: Path) -> bool:
    run = RunDir(path)
    if path.name.startswith(".") or run.manifest.is_file():
        return False
    return path.is_dir() and (run.config.is_file() or run.metrics.is_file() or (path / process.PID_FILE).is_file())


def last_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (a half-written last line, while training, is skipped)."""
    rows: list[dict[str, Any]] = []
    metrics = RunDir(path).metrics
    if not metrics.is_file():
        return rows
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def run_status(path: str | Path) -> str:
    """``running``, ``finished``, ``finished (regressed)``, ``stopped`` or ``failed`` (see the module docstring)."""
    run = RunDir(path)
    if process.read_pid(run.path) is not None:
        return "running"
    if run.record.is_file():
        try:
            record = RunRecord.from_file(run.record)
        except NotARunError:
            return "failed"
        return "finished (regressed)" if record.regressed else "finished"
    if has_last_checkpoint(run.path):
        return "stopped"
    return "failed"


def has_last_checkpoint(path: str | Path) -> bool:
    """The run has a ``last`` checkpoint (``save_every``, or the one SIGTERM writes) that ``--resume`` continues."""
    from tuneforge.training.checkpoint import CheckpointDir, PointerUnreadable

    try:
        return CheckpointDir(RunDir(path).checkpoints).current("last") is not None
    except PointerUnreadable:
        return False


def _config_tree(run: RunDir) -> dict[str, Any]:
    try:
        return _parsed_config(str(run.config), run.config.stat().st_mtime_ns)
    except OSError:
        return {}


@functools.lru_cache(maxsize=256)
def _parsed_config(path: str, mtime_ns: int) -> dict[str, Any]:
    """A run's config, parsed once per version of the file (pure-Python YAML takes ~10-25 ms a config, and the tab
    lists every run every few seconds). Read only: the dict is shared."""
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return tree if isinstance(tree, dict) else {}


def _best_score(run: RunDir, record: RunRecord | None) -> str:
    try:
        report = EvalReport.load(run.path)
    except NotARunError:
        report = None
    if report is not None and report.main_metric:
        for scores in report.set_scores():
            tuned = next((c for c in scores.columns if c != "base"), None)
            score = scores.columns[tuned].metrics.get(report.main_metric) if tuned else None
            if score is not None and isinstance(score.value, int | float):
                return f"{report.main_metric} {score.value:.3f} ({scores.name}, {tuned})"
    if record is not None and record.best_eval_loss is not None:
        return f"{record.eval_metric or 'eval_loss'} {record.best_eval_loss:.4f} (step {record.best_step})"
    return ""


def _gates(run: RunDir) -> str:
    """The pipeline's gates, where ``tuneforge pipeline`` recorded them (``pipeline/state.json``, the gates stage):
    ``name passed`` / ``name accepted`` / ``name FAILED``."""
    path = run.pipeline_state
    try:
        state = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return ""
    stage = (state.get("stages") or {}).get("gates") if isinstance(state, dict) else None
    gates = stage.get("gates") if isinstance(stage, dict) else None
    if not isinstance(gates, list):
        return ""
    verdict = {"passed": "passed", "accepted": "accepted", "failed": "FAILED"}
    return ", ".join(f"{g.get('name')} {verdict.get(str(g.get('verdict')), 'FAILED')}" for g in gates
                     if isinstance(g, dict))


def summarize(path: str | Path) -> RunSummary:
    """The Runs tab's row of one run directory."""
    run = RunDir(path)
    try:
        record = RunRecord.load(run.path)
    except NotARunError:
        record = None
    tree = _config_tree(run)
    rows = last_metrics(run.path)
    data = tree.get("data") if isinstance(tree.get("data"), dict) else {}
    train = (record.data[0].path if record and record.data else None) or (data or {}).get("train") or ""
    steps = record.steps if record and record.steps is not None else (rows[-1].get("step") if rows else None)
    time_s = record.wall_time_s if record and record.wall_time_s is not None else (
        rows[-1].get("elapsed_s") if rows else None)
    modified = max((p.stat().st_mtime for p in (run.path, run.metrics, run.record) if p.exists()), default=0.0)
    return RunSummary(run.path, run_status(run.path), str((record.method if record else None) or tree.get("method")
                      or ""), Path(str(train)).name if isinstance(train, str) else str(train), steps,
                      _best_score(run, record), time_s, _gates(run), modified)


def list_runs(folder: str | Path) -> list[RunSummary]:
    """Every run directory directly under ``folder`` (and ``folder`` itself when it is one), newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = [folder] + sorted(p for p in folder.iterdir() if p.is_dir())
    runs = [summarize(p) for p in candidates if is_run_dir(p)]
    return sorted(runs, key=lambda r: -r.modified)


def table(folder: str | Path) -> list[list[Any]]:
    return [r.row() for r in list_runs(folder)]


def build(folder: str, refresh_s: float = 5.0) -> list[Any]:
    """The tab's components: the table, refreshed every ``refresh_s`` seconds and on the Refresh button. Returns the
    tab's timers."""
    import gradio as gr

    gr.Markdown(f"Runs under `{folder}`: status from each run directory's files (`studio.pid`, `run.json`, "
                "`checkpoints/last`); best score from `eval/report.json`, else the best validation loss.")
    timer = gr.Timer(refresh_s)
    grid = gr.Dataframe(value=lambda: table(folder), headers=COLUMNS, interactive=False, wrap=True,
                        elem_id="runs-table", every=timer)
    gr.Button("Refresh", elem_id="runs-refresh").click(lambda: table(folder), outputs=grid)
    return [timer]
