"""One strategy per engine (one process, DDP, FSDP2, DeepSpeed) behind one small interface (``base.py``);
``training/distributed.py``'s :func:`~tuneforge.training.distributed.setup_distributed` picks the launch's."""

from __future__ import annotations

from tuneforge.training.strategies.base import Gathered, ObjectiveModule, Parallel, Strategy, saved_launch
from tuneforge.training.strategies.ddp import DDP
from tuneforge.training.strategies.deepspeed import DeepSpeed
from tuneforge.training.strategies.fsdp2 import FSDP2
from tuneforge.training.strategies.single import SingleProcess

__all__ = ["DDP", "FSDP2", "DeepSpeed", "Gathered", "ObjectiveModule", "Parallel", "SingleProcess", "Strategy",
           "saved_launch"]
