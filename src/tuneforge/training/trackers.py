"""Experiment trackers beside ``metrics.jsonl``: ``report_to: [tensorboard, wandb, mlflow]`` through accelerate's
tracker classes (the ones ``Accelerator(log_with=...)`` uses), written by the main process only.

Every logged row (training steps and evaluations) goes to each tracker at its step, numbers only; the run
config, flattened to ``section.key`` scalars, is stored as the run's hyperparameters. TensorBoard logs go to
``<run>/tracking/<run name>/`` (``tensorboard --logdir runs/x/tracking``); W&B and MLflow use their own
settings (``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuneforge.config.trackers import TRACKERS, check_trackers
from tuneforge.runs.layout import RunDir


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif isinstance(value, (bool, int, float, str)) or value is None:
            out[name] = value
        else:
            out[name] = str(value)
    return out


class Trackers:
    """The configured trackers of one run (none on processes other than the main one)."""

    def __init__(self, names: Sequence[str], run_name: str, run_dir: Path, hyperparameters: dict[str, Any],
                 enabled: bool = True) -> None:
        self.trackers: list[Any] = []
        check_trackers(names)
        if not enabled:
            return
        import accelerate.tracking as tracking  # type: ignore[import-untyped]

        for name in names:
            cls = getattr(tracking, TRACKERS[name][0])
            if name == "tensorboard":
                tracker = cls(run_name, RunDir(run_dir).tracking)
            elif name == "wandb":
                tracker = cls(run_name)
            else:
                tracker = cls(run_name, logging_dir=str(RunDir(run_dir).tracking))
            tracker.start()
            hp = {k: ("" if v is None else v) for k, v in _flat(hyperparameters).items()} if name == "tensorboard" \
                else _flat(hyperparameters)
            tracker.store_init_configuration(hp)
            self.trackers.append(tracker)

    def log(self, row: dict[str, Any]) -> None:
        values = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and k != "step"}
        for tracker in self.trackers:
            tracker.log(values, step=row.get("step"))

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
