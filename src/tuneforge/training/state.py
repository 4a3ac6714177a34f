"""All the mutable state of a training run, saved and loaded in one place.

:class:`TrainState` holds what changes while a run trains and is not the model's weights: the counters
(optimizer step, data cursor as epoch + micro-batch index, tokens seen), the best score and when it was
reached, the count of evaluations without improvement, how many rows ``metrics.jsonl`` holds, the
optimizer's and scheduler's state and every random generator (Python, numpy, torch CPU and CUDA). A
checkpoint is the model's trained weights plus :meth:`TrainState.save`'s ``trainer_state.pt``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    """The state of every random generator a run draws from."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """Counters and scores of a run; ``optimizer`` and ``scheduler`` are the live objects whose state is saved.

    ``epoch`` and ``micro_batch`` are the data cursor: the next micro-batch the loop takes is number
    ``micro_batch`` (0-based) of epoch ``epoch``'s shuffled order.
    """

    step: int = 0
    epoch: int = 0
    micro_batch: int = 0
    seen_tokens: int = 0
    last_loss: float | None = None
    best_score: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    metrics_rows: int = 0
    skipped_steps: int = 0                    # steps whose loss or gradients were not finite
    scaler_skipped_steps: int = 0             # fp16-mixed: steps the gradient scaler skipped (overflow)
    first_loss: float | None = None           # the divergence check's yardstick
    diverging_steps: int = 0
    collapsed_steps: int = 0                  # consecutive steps at a uniform guess or with zero gradients
    base_score: float | None = None           # validation of the model before training (eval_base)
    first_eval: tuple[int, float] | None = None   # (step, score) of the first validation during training
    last_eval: tuple[int, float] | None = None    # (step, score) of the latest
    source_examples: dict[str, int] = field(default_factory=dict)   # a mixture: examples drawn from each source
    source_tokens: dict[str, int] = field(default_factory=dict)     # ... and their tokens
    fingerprint: dict[str, Any] = field(default_factory=dict)   # what a resumed run must match (config, data)
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False, compare=False)
    scheduler: Any = field(default=None, repr=False, compare=False)
    precision: Any = field(default=None, repr=False, compare=False)     # training/precision.py: the loss scaler's state

    def counters(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.compare}

    def state_dict(self, optimizer_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """``optimizer_state``: the optimizer's, when the caller gathered it (FSDP2: keyed by parameter names)."""
        if optimizer_state is None and self.optimizer is not None:
            optimizer_state = self.optimizer.state_dict()
        return {"counters": self.counters(), "rng": rng_state(), "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.precision.state_dict() if self.precision is not None else None}

    def load_state_dict(self, state: dict[str, Any], restore_rng: bool = True,
                        load_optimizer: Callable[[dict[str, Any]], None] | None = None) -> None:
        """``load_optimizer``: how to load the optimizer's state when not ``optimizer.load_state_dict`` (FSDP2)."""
        for key, value in state["counters"].items():
            setattr(self, key, value)
        if self.optimizer is not None and state.get("optimizer") is not None:
            (load_optimizer or self.optimizer.load_state_dict)(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.precision is not None:
            self.precision.load_state_dict(state.get("scaler"))
        if restore_rng:
            set_rng_state(state["rng"])

    def save(self, folder: str | Path, optimizer_state: dict[str, Any] | None = None) -> Path:
        path = Path(folder) / STATE_FILE
        torch.save(self.state_dict(optimizer_state), path)
        return path

    def load(self, folder: str | Path, restore_rng: bool = True) -> None:
        self.load_state_dict(read_state(folder), restore_rng=restore_rng)


def read_state(folder: str | Path) -> dict[str, Any]:
    """What :meth:`TrainState.save` wrote into ``folder`` (without applying it)."""
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two fingerprints (nested dicts compared key by key)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out
