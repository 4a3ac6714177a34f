"""One process: no wrapper, no communication. The loop's calls are the plain torch ones."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from tuneforge.training.strategies.base import BuildOptimizer, Strategy, trained_parameters


class SingleProcess(Strategy):
    """One process on the run config's device (``device``: auto, cpu, cuda, mps)."""

    def setup(self, build_optimizer: BuildOptimizer) -> torch.optim.Optimizer:
        return build_optimizer(self.config, trained_parameters(self.model))

    def forward_backward(self, batch: Any, normaliser: float, last: bool) -> Any:
        if self.objective.normaliser(batch) == 0:         # nothing to learn from (no process waits for it)
            return None
        with self.precision.autocast():
            out = self.objective.loss(self.model, batch, self.config)
        self.precision.backward(out.loss_sum / normaliser)
        return out

    def barrier(self) -> None:
        pass

    def broadcast(self, value: Any) -> Any:
        return value

    def sum(self, value: float) -> float:
        return value

    def sum_each(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def all_gather_objects(self, value: Any) -> list[Any]:
        return [value]

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        yield
