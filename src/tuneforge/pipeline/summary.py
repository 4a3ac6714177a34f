"""The pipeline summary: every stage with its time, outputs and hashes, every gate with its numbers.

Written as ``pipeline/summary.json`` and ``pipeline/summary.md`` in the run directory; :func:`table` is the
markdown table printed at the end of ``tuneforge pipeline`` and ``tuneforge quickstart``.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.pipeline.gates import GateResult


@dataclass
class StageRow:
    """One stage of this run: ``status`` is ``ran``, ``skipped`` (inputs unchanged), ``failed`` or ``not run``
    (outside --from/--until, or after a stop); ``seconds`` of this run (0 when skipped)."""

    name: str
    status: str
    seconds: float = 0.0
    note: str = ""
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


def _short(sha: str) -> str:
    return sha if sha == "missing" else sha[:12]


def _rel(path: str, run_dir: Path) -> str:
    try:
        return str(Path(path).relative_to(run_dir))
    except ValueError:
        return path


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(stages: list[StageRow], gates: list[GateResult], run_dir: Path) -> str:
    """Stages, then gates, as markdown tables."""
    lines = ["| stage | status | seconds | outputs | note |", "|---|---|---:|---|---|"]
    for s in stages:
        outs = ", ".join(f"{_rel(p, run_dir)} ({_short(h)})" for p, h in s.outputs.items())
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {_cell(outs)} | {_cell(s.note)} |")
    if gates:
        lines += ["", "| gate | verdict | threshold | numbers |", "|---|---|---|---|"]
        for g in gates:
            why = f" (accepted: {g.accepted})" if g.accepted and not g.passed else ""
            lines.append(f"| {g.name} | {g.verdict} | {_cell(g.threshold)} | {_cell(g.detail + why)} |")
    return "\n".join(lines)


def summary_dict(stages: list[StageRow], gates: list[GateResult], run_dir: Path, stopped: str | None) -> dict:
    return {"run_dir": str(run_dir), "stopped": stopped, "stages": [asdict(s) for s in stages],
            "gates": [g.to_dict() for g in gates]}


def write_summary(out_dir: Path, stages: list[StageRow], gates: list[GateResult], run_dir: Path,
                  stopped: str | None) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``summary.md`` (the tables, then each stage's input and output hashes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = summary_dict(stages, gates, run_dir, stopped)
    md = [f"# Pipeline: {run_dir}", "", f"Stopped: {stopped}" if stopped else "Finished.", "", table(stages, gates,
                                                                                                      run_dir), ""]
    for s in stages:
        if not (s.inputs or s.outputs):
            continue
        md += [f"## {s.name}", "", "| | file or setting | sha256 |", "|---|---|---|"]
        md += [f"| input | {_cell(_rel(k, run_dir))} | `{v}` |" for k, v in s.inputs.items()]
        md += [f"| output | {_cell(_rel(k, run_dir))} | `{v}` |" for k, v in s.outputs.items()]
        md.append("")
    json_path, md_path = out_dir / "summary.json", out_dir / "summary.md"
    json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    md_path.write_text("\n".join(md))
    return json_path, md_path


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='pipeline'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_section(stages: list[StageRow], gates: list[GateResult], run_dir: Path, stopped: str | None) -> str:
    """The pipeline's stages and gates as HTML tables (escaped), for the evaluation report's Pipeline section."""
    rows = [[s.name, s.status, f"{s.seconds:.1f}",
             ", ".join(f"{_rel(p, run_dir)} ({_short(h)})" for p, h in s.outputs.items()), s.note] for s in stages]
    out = f"<p class='meta'>{html.escape(stopped or 'finished')} · summary: pipeline/summary.md</p>"
    out += _html_table(["stage", "status", "seconds", "outputs (sha256)", "note"], rows)
    if gates:
        out += _html_table(["gate", "verdict", "threshold", "numbers"],
                           [[g.name, g.verdict, g.threshold,
                             g.detail + (f" (accepted: {g.accepted})" if g.accepted and not g.passed else "")]
                            for g in gates])
    return out


def add_to_report_html(report_dir: Path, stages: list[StageRow], gates: list[GateResult], run_dir: Path,
                       stopped: str | None) -> Path | None:
    """Rewrite ``report.html`` from ``report.json`` with a Pipeline section (None when there is no report).
    ``report.html`` is rendered from ``report.json``, so the evaluate stage records only the JSON and the markdown
    as its outputs: this rewrite does not make it out of date."""
    from tuneforge.evaluation.report import to_html
    from tuneforge.runs import EvalReport

    record = EvalReport.load(report_dir.parent) if (report_dir / "report.json").is_file() else None
    if record is None:
        return None
    page = to_html(record.to_dict(), [("Pipeline", html_section(stages, gates, run_dir, stopped))])
    out = report_dir / "report.html"
    tmp = out.with_name(f".report.html.tmp-{os.getpid()}")
    tmp.write_text(page)
    os.replace(tmp, out)
    return out
