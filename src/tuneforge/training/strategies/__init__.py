"""One strategy per engine (one process, DDP, FSDP2, DeepSpeed) behind one small interface (``base.py``);
``training/distributed.py``'s :func:`~tuneforge.training.distributed.setup_distributed` picks the launch's."""

from __future__ import annotations

from typing import Any

from tuneforge.training.strategies.base import WHOLE, Gathered, ObjectiveModule, Parallel, Strategy
from tuneforge.training.strategies.ddp import DDP
from tuneforge.training.strategies.deepspeed import DeepSpeed
from tuneforge.training.strategies.fsdp2 import FSDP2
from tuneforge.training.strategies.single import SingleProcess

__all__ = ["DDP", "FSDP2", "DeepSpeed", "Gathered", "ObjectiveModule", "Parallel", "SingleProcess", "Strategy",
           "saved_launch"]


def saved_launch(optimizer_state: dict[str, Any]) -> str:
    """The launch (:attr:`Strategy.launch`) of the run that saved ``optimizer_state`` (a checkpoint's): the engines
    whose optimizer state only they can load recognise theirs; one process and DDP save alike."""
    for engine in (DeepSpeed, FSDP2):
        launch = engine.saved_launch(optimizer_state)
        if launch is not None:
            return launch
    return WHOLE
