"""Training on several processes through accelerate: what the loop needs to know, in one place.

``accelerate launch`` (or ``torchrun``) starts ``tuneforge train CONFIG`` once per process; the environment
(``WORLD_SIZE``, ``RANK``, ...) says so, and :func:`setup_distributed` then creates accelerate's
``Accelerator``, which owns the process group (NCCL on GPUs, gloo on CPUs) and wraps the model for the
chosen engine. tuneforge has no process-group or sharding code of its own. Supported and tested today:
DDP (``tests/test_distributed.py``: 2 processes on CPU with gloo end with the 1-process parameters).

What the loop does with it (``training/trainer.py``):

* Every process draws the same micro-batches of an optimizer step from the same seeded stream
  (``world x gradient_accumulation_steps`` of them) and trains on its share ``rank::world``; so every process
  runs the same number of micro-batches (DDP would hang otherwise), the data cursor is the same everywhere
  (resume needs no per-rank state) and the step's normaliser (target tokens, or pairs) is summed over all
  of them without communication.
* The objective's loss runs inside the wrapped module (:class:`ObjectiveModule`: forward, LM head and loss
  in one ``forward``), so DDP's hooks see every parameter that gets a gradient; gradients are synchronised on
  the last micro-batch only (``no_sync`` before). DDP averages gradients over processes, so each process
  scales its loss sum by ``world / normaliser``: the result is the gradient of the step's total loss over
  its total normaliser, as on one process.
* The scheduler is tuneforge's own and steps once per optimizer step (never accelerate's wrapped scheduler,
  which steps once per process); the optimizer is not wrapped either (its state is saved as on one process).
* Files (checkpoints, metrics, run.json, plots) are written by the main process only, with barriers; the
  logged loss is reduced over processes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


def launched_distributed() -> bool:
    """Whether this process was started by ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Distributed:
    """One process of a (possibly 1-process) run. ``accelerator`` is None on a single process."""
    accelerator: Any = None
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def device(self) -> torch.device | None:
        return self.accelerator.device if self.accelerator is not None else None

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` wrapped for the engine (DDP, ...); itself on one process."""
        if not self.enabled:
            return module
        return self.accelerator.prepare_model(module)

    @contextlib.contextmanager
    def no_sync(self, wrapped: torch.nn.Module, skip: bool) -> Iterator[None]:
        """No gradient synchronisation inside the block when ``skip`` (every micro-batch but the step's last)."""
        if self.enabled and skip:
            with self.accelerator.no_sync(wrapped):
                yield
        else:
            yield

    def sum(self, value: float) -> float:
        """``value`` summed over the processes."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.enabled:
            self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. filling the tokenized-data cache), then the others."""
        if not self.enabled:
            yield
            return
        with self.accelerator.main_process_first():
            yield


def setup_distributed(cpu: bool = False) -> Distributed:
    """The accelerate state of this process; a plain single-process :class:`Distributed` when not launched."""
    if not launched_distributed():
        return Distributed()
    from accelerate import Accelerator  # type: ignore[import-untyped]
    from accelerate.utils import DistributedType  # type: ignore[import-untyped]

    accelerator = Accelerator(cpu=cpu)
    requested = [name for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                 if os.environ.get(env, "").lower() in ("1", "true", "yes")]
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED) or requested:
        from tuneforge.config import ConfigError

        # (on CPUs accelerate would even run an FSDP request as DDP, or as independent processes)
        engine = requested[0] if requested else accelerator.distributed_type.value
        raise ConfigError(f"accelerate is set up for {engine}: tuneforge train runs DDP across processes today "
                          "(FSDP and DeepSpeed are not tested yet); use an accelerate config with distributed_type "
                          "MULTI_GPU (or MULTI_CPU), or `tuneforge plan --accelerate-config` to size one")
    launched = int(os.environ["WORLD_SIZE"])
    if accelerator.num_processes != launched:
        from tuneforge.config import ConfigError

        # e.g. accelerate's FSDP plugin on a machine without GPUs falls back to DistributedType.NO: every process
        # would train alone and write the same run directory
        raise ConfigError(f"{launched} processes were launched but accelerate set up {accelerator.num_processes} "
                          f"({accelerator.distributed_type.value}); FSDP and DeepSpeed need GPUs: on CPUs use DDP "
                          "(torchrun, or an accelerate config with distributed_type MULTI_CPU)")
    return Distributed(accelerator, accelerator.process_index, accelerator.num_processes)


class ObjectiveModule(torch.nn.Module):
    """The model and the objective's loss as one module, so a DDP/FSDP wrapper runs forward, LM head and loss
    inside its hooks: ``wrapped(batch)`` returns the objective's :class:`ObjectiveOutput`."""

    def __init__(self, model: torch.nn.Module, objective: Any, config: Any):
        super().__init__()
        self.model = model
        self.objective = objective
        self.config = config

    def forward(self, batch: Any) -> Any:
        return self.objective.loss(self.model, batch, self.config)
