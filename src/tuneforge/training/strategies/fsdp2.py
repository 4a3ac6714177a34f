"""FSDP2 through accelerate (``distributed_type: FSDP``, ``fsdp_version: 2``: torch's ``fully_shard``).

* :meth:`FSDP2.setup` runs accelerate's ``fsdp2_prepare_model`` (the model half of ``Accelerator.prepare`` under
  FSDP2: ``fully_shard`` on each decoder layer, then on the root :class:`ObjectiveModule`), and builds the
  optimizer afterwards, over the sharded (DTensor) parameters ``fully_shard`` put in place. FSDP2 averages
  gradients over processes as DDP does, so the loop's loss scaling is unchanged.
* The root's own parameters (embeddings, final norm, tied LM head) are gathered only inside the root's forward:
  anything that runs the model outside training's forward (evaluation) goes through it (:meth:`FSDP2.run`,
  ``ObjectiveModule(run=fn)``), on every process.
* The gradient norm (clipping and the logged value) is that of the full gradient: the DTensor norm, reduced
  (:meth:`FSDP2.clip_grad_norm`).
* Saving gathers the full state dicts (torch's ``get_model_state_dict`` / ``get_optimizer_state_dict``,
  ``full_state_dict=True, cpu_offload=True``): a collective every process joins, after which the main process
  alone writes the same files as on one process (the optimizer state keyed by parameter names). Resume loads
  them back with ``set_model_state_dict`` / ``set_optimizer_state_dict``.
* Proven for ``lora`` and ``full`` on ``sft`` / ``pretrain`` (``tests/test_distributed_fsdp.py``): the methods whose
  record lists ``fsdp2`` (:mod:`tuneforge.methods.engines`); QLoRA, the other methods and tasks, FSDP1 and the FSDP
  settings not tested are refused with one line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tuneforge.training.strategies.base import (
    BuildOptimizer,
    Gathered,
    ObjectiveModule,
    Parallel,
    trained_parameters,
)

log = logging.getLogger(__name__)

# the tasks FSDP2 is proven to train (tests/test_distributed_fsdp.py; its methods: the records' engines); the rest
# is refused with one line
FSDP2_TASKS = ("sft", "pretrain")


class FSDP2(Parallel):
    """Parameters, gradients and optimizer state split over the processes."""

    engine = "fsdp2"

    @property
    def precision_by_engine(self) -> bool:
        return True

    @property
    def launch(self) -> str:
        return "FSDP2"

    @staticmethod
    def saved_launch(optimizer_state: dict[str, Any]) -> str | None:
        """``launch`` of the run that saved ``optimizer_state``, if FSDP2 did: its state is keyed by names."""
        by_name = any(isinstance(p, str) for g in optimizer_state.get("param_groups", []) for p in g["params"])
        engine = optimizer_state.get("engine") or ("fsdp2" if by_name else None)
        return "FSDP2" if engine == "fsdp2" else None

    def check(self, config: Any) -> None:
        """Refuse, with one line, what FSDP2 is not proven to train (a method whose record does not list
        ``fsdp2``, :data:`FSDP2_TASKS`)."""
        from tuneforge.errors import ConfigError

        super().check(config)
        if config.task not in FSDP2_TASKS:
            raise ConfigError(f"task {config.task} with FSDP2 is not tested yet (FSDP2 trains tasks "
                              f"{' and '.join(FSDP2_TASKS)}); train it with DDP (distributed_type MULTI_GPU)")
        if config.init_from:
            raise ConfigError("init_from with FSDP2 is not tested yet (the adapter loads before the model is "
                              "sharded); train it with DDP (distributed_type MULTI_GPU) or on one process")

    def setup(self, build_optimizer: BuildOptimizer) -> torch.optim.Optimizer:
        # the model half of Accelerator.prepare(model, optimizer) under FSDP2 (its prepare_model refuses FSDP2):
        # the auto-wrap policy of the accelerate config, fully_shard per layer, then the root
        from accelerate.utils import fsdp2_prepare_model  # type: ignore[import-untyped]
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        self.wrapped = wrapped = fsdp2_prepare_model(self.accelerator,
                                                     ObjectiveModule(self.model, self.objective, self.config))
        params = list(wrapped.parameters())
        log.info("FSDP2: %d of %d parameter tensors sharded over %d processes, in %d groups",
                 sum(isinstance(p, DTensor) for p in params), len(params), self.world,
                 sum(isinstance(m, FSDPModule) for m in wrapped.modules()))
        return build_optimizer(self.config, trained_parameters(self.model))       # over the shards

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Each process holds a shard of each gradient (a DTensor): the shards' norms are reduced into the full
        norm, one process's."""
        from torch.distributed.tensor import DTensor

        total = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(self.params, max_norm, total)
        return total

    def run(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        """``fn(model)`` inside the root's forward (where the root's parameters are gathered; every process must
        call it), the parameters resharded after."""
        assert self.wrapped is not None
        try:
            return self.wrapped(run=fn)
        finally:
            reshard(self.wrapped)

    def gather(self, with_optimizer: bool) -> Gathered:
        """The full state dict of the wrapped model (names as in ``wrapped.model``) and, ``with_optimizer``, the
        optimizer's (keyed by parameter names), on the CPU of the main process (the others get empty dicts)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        wrapped = self.wrapped
        assert wrapped is not None
        reshard(wrapped)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(wrapped, options=options)
        state: dict[str, Any] = {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")}
        # tied weights (embeddings and LM head) are gathered as two tensors: one again, as on one process
        first: dict[int, str] = {}
        for name, value in wrapped.get_submodule("model").state_dict(keep_vars=True).items():
            if id(value) in first and name in state and first[id(value)] in state:
                state[name] = state[first[id(value)]]
            first.setdefault(id(value), name)
        optim = get_optimizer_state_dict(wrapped, self.optimizer, options=options) if with_optimizer else None
        return Gathered(self.model, self.config, state, optim)

    def load_trained(self, folder: Path, read: Callable[[str], torch.Tensor], names: set[str]) -> None:
        """Full tensors into the sharded parameters, on every process."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        assert self.wrapped is not None
        # in one order on every process (a set's order differs between processes; each is a collective)
        tensors = {name: read(name) for name in sorted(names)}
        reshard(self.wrapped)
        set_model_state_dict(self.wrapped, {f"model.{k}": v for k, v in tensors.items()},
                             options=StateDictOptions(full_state_dict=True, strict=False))

    def load_optimizer(self, state: dict[str, Any]) -> None:
        """What :meth:`gather` saved of the optimizer, sharded, on every process."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        assert self.wrapped is not None
        set_optimizer_state_dict(self.wrapped, self.optimizer, state, options=StateDictOptions(full_state_dict=True))


def reshard(wrapped: torch.nn.Module) -> None:
    """Every parameter back to its shard (``FSDPModule.reshard`` of each sharded module; the root keeps its
    parameters gathered after a forward that no backward follows, such as an evaluation)."""
    from torch.distributed.fsdp import FSDPModule

    for module in wrapped.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def fsdp1_refused(version: Any) -> Exception:
    from tuneforge.errors import ConfigError

    return ConfigError(f"accelerate is set up for FSDP version {version}: tuneforge train runs FSDP2; set "
                       "fsdp_version: 2 in the accelerate config's fsdp_config (as examples/distributed/fsdp_1x8.yaml)")


def check_plugin(accelerator: Any) -> None:
    """Refuse (one line) the FSDP settings tuneforge train is not proven with; drop the one it does not use."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    from tuneforge.errors import ConfigError

    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise fsdp1_refused(plugin.fsdp_version)
    if plugin.activation_checkpointing:
        raise ConfigError("fsdp_activation_checkpointing is not tested with tuneforge train: set it to false (and "
                          "gradient_checkpointing: true in the run config to save activation memory)")
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise ConfigError("fsdp_offload_params is not tested with tuneforge train: set it to false")
    if plugin.cpu_ram_efficient_loading:
        # transformers would load empty weights on every process but the first (accelerate's default `true`);
        # tuneforge loads the model and applies its method on every process, then FSDP2 shards it
        plugin.cpu_ram_efficient_loading = False
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
        if accelerator.is_main_process:
            log.info("fsdp_cpu_ram_efficient_loading is not used: every process loads the model, then FSDP2 "
                     "shards it")
