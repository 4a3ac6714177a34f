"""The ``report_to:`` key's trackers and the check that each one's package is installed (at config load,
so a missing package fails in one line before the model loads). :mod:`tuneforge.training.trackers` runs them."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from tuneforge.errors import ConfigError

# tracker name -> (accelerate class, the modules any of which it needs, what to install)
TRACKERS = {
    "tensorboard": ("TensorBoardTracker", ("tensorboardX", "tensorboard"), "tensorboardX (pip install tensorboardX)"),
    "wandb": ("WandBTracker", ("wandb",), "wandb (pip install wandb)"),
    "mlflow": ("MLflowTracker", ("mlflow",), "mlflow (pip install mlflow)"),
}


def check_trackers(names: Sequence[str]) -> None:
    """Raise :class:`ConfigError` (one line) when a tracker's package is not installed."""
    for name in names:
        _, modules, install = TRACKERS[name]
        if not any(importlib.util.find_spec(m) for m in modules):
            raise ConfigError(f"report_to: {name} needs {install}")
