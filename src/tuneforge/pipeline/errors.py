"""Why a pipeline run stopped: a stage failed (exit 2) or a gate failed (exit 1)."""

from __future__ import annotations


class StageFailed(RuntimeError):
    """A stage raised; the earlier stages' outputs are kept. ``str()`` is the one line the CLI prints."""

    def __init__(self, stage: str, reason: str, run_dir: str) -> None:
        self.stage, self.reason, self.run_dir = stage, reason, run_dir
        super().__init__(f"stage {stage} failed: {reason} (earlier stages' outputs kept in {run_dir})")


class GateFailed(RuntimeError):
    """A gate failed and was not accepted; nothing after the gates stage ran. ``str()`` names the gate, its numbers
    and the report."""

    def __init__(self, gate: str, detail: str, report: str) -> None:
        self.gate, self.detail, self.report = gate, detail, report
        super().__init__(f"gate {gate} failed: {detail}; report: {report} "
                         f"(override: --accept-gate {gate} --reason TEXT)")
