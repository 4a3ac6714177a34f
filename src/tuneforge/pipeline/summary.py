"""The pipeline summary: every stage with its time, outputs and hashes, every gate with its numbers.

Written as ``pipeline/summary.json`` and ``pipeline/summary.md`` in the run directory; :func:`table` is the
markdown table printed at the end of ``tuneforge pipeline`` and ``tuneforge quickstart``.
"""

from __future__ import annotations

import json
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
