"""DDP through accelerate (``torchrun``, or ``accelerate launch`` with ``distributed_type`` MULTI_GPU / MULTI_CPU).

Every process holds the whole model; accelerate's ``prepare_model`` wraps :class:`ObjectiveModule` in torch's
``DistributedDataParallel``, whose hooks average the gradients over the processes at the step's last micro-batch
(:class:`~tuneforge.training.strategies.base.Parallel`). The optimizer is not wrapped: it steps, clips and saves
as on one process (:class:`~tuneforge.training.strategies.base.Strategy`'s defaults), so a DDP checkpoint
resumes on one process and back.
"""

from __future__ import annotations

import torch

from tuneforge.training.strategies.base import BuildOptimizer, ObjectiveModule, Parallel, trained_parameters


class DDP(Parallel):
    engine = "ddp"

    def setup(self, build_optimizer: BuildOptimizer) -> torch.optim.Optimizer:
        self.wrapped = self.accelerator.prepare_model(ObjectiveModule(self.model, self.objective, self.config))
        return build_optimizer(self.config, trained_parameters(self.model))
