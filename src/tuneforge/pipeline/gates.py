"""The gates between evaluate and package: named checks, each with its threshold, its numbers and a verdict.

=================  ===========================================================================================
gate               passes when
=================  ===========================================================================================
beats_baselines    for each baseline column: the paired bootstrap (:func:`tuneforge.evaluation.bootstrap.
                   paired_interval`) of tuned minus baseline over the same prompts, on each prompt's main-metric
                   verdict (``report.json`` keeps, per column, each answer's failure ``category``: ``null`` for a
                   correct answer), gives ``p_not_better`` (the share of resamples where tuned does not win) at
                   most ``max_p_not_better``
forgetting         the MMLU drop (base - tuned accuracy, ``report.json``'s ``forgetting.drop``) at most
                   ``max_drop``
failures           each capped failure category's count / the set's examples at most its cap
min_score          the column's main metric on the set at least ``min``
loss               ``run.json``'s status is not ``regressed``, every logged training loss is finite, and the
                   final logged loss is at most ``max_final_over_first`` x the first
=================  ===========================================================================================

A gate reads what the evaluation and training wrote (``eval/report.json``, ``run.json``, ``metrics.jsonl``); it
computes nothing of its own but the bootstrap.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tuneforge.config.pipeline import (
    BeatsBaselinesGate,
    FailuresGate,
    ForgettingGate,
    Gates,
    LossGate,
    MinScoreGate,
)
from tuneforge.evaluation.bootstrap import paired_interval
from tuneforge.runs import EvalReport, RunDir, RunRecord


@dataclass
class GateResult:
    """One gate's verdict: ``threshold`` (what it requires), ``numbers`` (what it measured), ``detail`` (one line)
    and ``accepted`` (the reason given with ``--accept-gate``, when a failed gate was overridden)."""

    name: str
    passed: bool
    threshold: str
    numbers: dict[str, Any]
    detail: str
    accepted: str | None = None

    @property
    def verdict(self) -> str:
        return "passed" if self.passed else ("accepted" if self.accepted else "failed")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateResult:
        return cls(d["name"], bool(d["passed"]), d.get("threshold", ""), d.get("numbers") or {}, d.get("detail", ""),
                   d.get("accepted"))


def _set(report: EvalReport, name: str) -> dict[str, Any] | None:
    return (report.sets or {}).get(name)


def _missing(gate: str, threshold: str, what: str) -> GateResult:
    return GateResult(gate, False, threshold, {}, what)


def _correct(column: dict[str, Any]) -> list[float] | None:
    """Each answer's verdict on the main metric (1 correct, 0 not): a correct answer has no failure category."""
    categories = column.get("categories")
    return None if categories is None else [0.0 if c else 1.0 for c in categories]


def beats_baselines(report: EvalReport, gate: BeatsBaselinesGate) -> GateResult:
    threshold = f"p_not_better <= {gate.max_p_not_better} against {', '.join(gate.against)} on {gate.set}"
    entry = _set(report, gate.set)
    if entry is None:
        return _missing("beats_baselines", threshold, f"the report has no set {gate.set!r}")
    columns, metric = entry.get("columns") or {}, report.main_metric or "main"
    numbers: dict[str, Any] = {"metric": metric, "set": gate.set}
    failed = []
    for baseline in gate.against:
        if "tuned" not in columns or baseline not in columns:
            return _missing("beats_baselines", threshold,
                            f"the report's set {gate.set!r} has no {baseline if 'tuned' in columns else 'tuned'} "
                            "column: add it to eval.columns")
        tuned, base = _correct(columns["tuned"]), _correct(columns[baseline])
        if tuned is None or base is None:
            return _missing("beats_baselines", threshold, f"the report's set {gate.set!r} keeps no per-answer "
                                                          "verdicts to pair on")
        diff = paired_interval(tuned, base, gate.resamples, seed=gate.seed)
        numbers[baseline] = {"tuned": sum(tuned) / len(tuned), "baseline": sum(base) / len(base),
                             "difference": diff.value, "low": diff.low, "high": diff.high, "n": diff.n,
                             "p_not_better": diff.p_not_better}
        if not diff.p_not_better <= gate.max_p_not_better:
            failed.append(baseline)
    parts = [f"tuned {numbers[b]['tuned']:.1%} vs {b} {numbers[b]['baseline']:.1%}, "
             f"p_not_better {numbers[b]['p_not_better']:.3f}" for b in gate.against]
    detail = f"{metric} on {gate.set} ({numbers[gate.against[0]]['n']} prompts): " + "; ".join(parts) + \
        (f"; level {gate.max_p_not_better}" if failed else "")
    return GateResult("beats_baselines", not failed, threshold, numbers, detail)


def forgetting(report: EvalReport, gate: ForgettingGate, default_max_drop: float) -> GateResult:
    max_drop = gate.max_drop if gate.max_drop is not None else default_max_drop
    threshold = f"MMLU drop <= {max_drop}"
    f = report.forgetting
    if not isinstance(f, dict) or not isinstance(f.get("drop"), dict):
        return _missing("forgetting", threshold, "the report has no forgetting section: set "
                                                 "eval.forgetting.enabled and eval.forgetting.data")
    drop = float(f["drop"]["value"])
    numbers = {"base": (f.get("base") or {}).get("value"), "tuned": (f.get("tuned") or {}).get("value"),
               "drop": drop, "low": f["drop"].get("low"), "high": f["drop"].get("high"), "max_drop": max_drop,
               "questions": f.get("questions")}
    return GateResult("forgetting", drop <= max_drop, threshold, numbers,
                      f"MMLU accuracy base {numbers['base']:.1%} -> tuned {numbers['tuned']:.1%}: drop {drop:.3f} "
                      f"(max {max_drop})")


def failures(report: EvalReport, gate: FailuresGate) -> GateResult:
    threshold = ", ".join(f"{c} <= {cap:.0%}" for c, cap in gate.caps.items()) + f" of {gate.column} on {gate.set}"
    entry = _set(report, gate.set)
    column = (entry or {}).get("columns", {}).get(gate.column) if entry else None
    if not column:
        return _missing("failures", threshold, f"the report has no column {gate.column!r} in set {gate.set!r}")
    fails = column.get("failures") or {}
    n = fails.get("n") or entry.get("n") or 0     # type: ignore[union-attr]
    counts = fails.get("counts") or {}
    numbers: dict[str, Any] = {"n": n, "column": gate.column, "set": gate.set}
    over = []
    for category, cap in gate.caps.items():
        share = counts.get(category, 0) / n if n else 0.0
        numbers[category] = {"count": counts.get(category, 0), "share": share, "cap": cap}
        if share > cap:
            over.append(f"{category} {counts.get(category, 0)}/{n} = {share:.1%} > {cap:.0%}")
    detail = "; ".join(over) if over else ", ".join(f"{c} {numbers[c]['count']}/{n}" for c in gate.caps)
    return GateResult("failures", not over, threshold, numbers, f"{gate.column} on {gate.set}: {detail}")


def min_score(report: EvalReport, gate: MinScoreGate) -> GateResult:
    metric = report.main_metric or "main"
    threshold = f"{gate.column} {metric} on {gate.set} >= {gate.min}"
    score = report.score(gate.set, gate.column, metric)
    value = score.number if score is not None else None
    if value is None:
        return _missing("min_score", threshold, f"the report has no {metric} of {gate.column} on set {gate.set!r} "
                                                "(eval.extra names the extra sets)")
    numbers = {"value": value, "low": score.low, "high": score.high, "min": gate.min, "set": gate.set,  # type: ignore
               "column": gate.column, "metric": metric}
    return GateResult("min_score", value >= gate.min, threshold, numbers,
                      f"{gate.column} {metric} on {gate.set}: {value:.3f} (min {gate.min})")


def _train_losses(metrics: Path) -> list[float]:
    losses = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("loss") is not None:
                losses.append(float(row["loss"]))
    return losses


def loss(run: RunDir, gate: LossGate) -> GateResult:
    threshold = f"status not regressed, losses finite, final/first <= {gate.max_final_over_first}"
    record = RunRecord.load(run.path)
    losses = _train_losses(run.metrics)
    if record is None or not losses:
        return _missing("loss", threshold, f"{run.path} has no run.json or no logged training loss")
    first, final = losses[0], losses[-1]
    finite = all(math.isfinite(x) for x in losses)
    ratio = final / first if finite and first > 0 else float("inf")
    numbers = {"first": first, "final": final, "ratio": ratio, "finite": finite, "status": record.status,
               "max_final_over_first": gate.max_final_over_first}
    passed = finite and not record.regressed and ratio <= gate.max_final_over_first
    detail = (f"training loss {first:.4f} -> {final:.4f} (x{ratio:.2f}, max x{gate.max_final_over_first})"
              + ("" if finite else ", a loss is not finite") + (f", status {record.status}" if record.regressed
                                                                 else ""))
    return GateResult("loss", passed, threshold, numbers, detail)


def check_gates(run: RunDir, gates: Gates, default_max_drop: float) -> list[GateResult]:
    """Every configured gate's result, in the order of :class:`~tuneforge.config.pipeline.Gates`' fields."""
    report = EvalReport.load(run.path) if run.report.is_file() else None
    out: list[GateResult] = []
    for name in Gates.model_fields:
        gate = getattr(gates, name)
        if gate is None:
            continue
        if name == "loss":
            out.append(loss(run, gate))
        elif report is None:
            out.append(_missing(name, "", f"{run.report} not found: run the evaluate stage"))
        elif name == "beats_baselines":
            out.append(beats_baselines(report, gate))
        elif name == "forgetting":
            out.append(forgetting(report, gate, default_max_drop))
        elif name == "failures":
            out.append(failures(report, gate))
        elif name == "min_score":
            out.append(min_score(report, gate))
    return out
