"""Training on several processes through accelerate: what the loop needs to know, in one place.

``accelerate launch`` (or ``torchrun``) starts ``tuneforge train CONFIG`` once per process; the environment
(``WORLD_SIZE``, ``RANK``, ...) says so, and :func:`setup_distributed` then creates accelerate's
``Accelerator``, which owns the process group (NCCL on GPUs, gloo on CPUs) and wraps the model for the
chosen engine. tuneforge has no process-group or sharding code of its own. Supported and tested today:
DDP (``tests/test_distributed.py``: 2 processes on CPU with gloo end with the 1-process parameters) and
FSDP2 (accelerate's ``fsdp_version: 2``, i.e. torch's ``fully_shard``) for ``lora`` and ``full`` on the
``sft``/``pretrain`` objectives (``tests/test_distributed_fsdp.py``, same proof). DeepSpeed, FSDP1, and the
FSDP2 combinations not tested (QLoRA, other methods, preference training, ...) are refused with one line.

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

What FSDP2 adds (``Distributed.sharded``):

* :meth:`Distributed.wrap` runs accelerate's ``fsdp2_prepare_model`` (the model half of ``Accelerator.prepare``
  under FSDP2: ``fully_shard`` on each decoder layer, then on the root :class:`ObjectiveModule`), and the
  trainer builds its optimizer afterwards, over the sharded (DTensor) parameters ``fully_shard`` put in place.
  FSDP2 averages gradients over processes as DDP does, so the loss scaling above is unchanged.
* The root's own parameters (embeddings, final norm, tied LM head) are gathered only inside the root's forward:
  anything that runs the model outside training's forward (evaluation) goes through it
  (:meth:`Distributed.run`, ``ObjectiveModule(run=fn)``), on every process.
* The gradient norm (clipping and the logged value) is that of the full gradient: the DTensor norm, reduced
  (:meth:`Distributed.clip_grad_norm`).
* Saving gathers the full state dicts (torch's ``get_model_state_dict`` / ``get_optimizer_state_dict``,
  ``full_state_dict=True, cpu_offload=True``): a collective every process joins, after which the main process
  alone writes the same files as on one process (the optimizer state keyed by parameter names). Resume loads
  them back with ``set_model_state_dict`` / ``set_optimizer_state_dict``.
* accelerate turns FSDP on only on GPUs (on CPUs an FSDP config runs as DDP). For tests only,
  ``TUNEFORGE_TEST_FSDP_ON_CPU=1`` with an FSDP2 request on CPUs puts accelerate's state into FSDP mode with the
  plugin accelerate would have built (``FSDP_*`` environment), so that the same accelerate code path runs on
  gloo; :data:`FSDP_ON_CPU_FOR_TESTS`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch

log = logging.getLogger(__name__)

# test-only switch: run accelerate's FSDP2 path on CPUs (gloo), where accelerate itself would run DDP
FSDP_ON_CPU_FOR_TESTS = "TUNEFORGE_TEST_FSDP_ON_CPU"
# what FSDP2 is proven to train (tests/test_distributed_fsdp.py); the rest is refused with one line
FSDP2_METHODS = ("lora", "full")
FSDP2_TASKS = ("sft", "pretrain")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def launched_distributed() -> bool:
    """Whether this process was started by ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Distributed:
    """One process of a (possibly 1-process) run. ``accelerator`` is None on a single process."""
    accelerator: Any = None
    rank: int = 0
    world: int = 1
    sharded: bool = False          # FSDP2: parameters, gradients and optimizer state split over the processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def device(self) -> torch.device | None:
        return self.accelerator.device if self.accelerator is not None else None

    def check(self, config: Any) -> None:
        """Refuse, with one line, a run this engine is not proven to train (FSDP2: see :data:`FSDP2_METHODS`)."""
        if not self.sharded:
            return
        from tuneforge.config import ConfigError

        if config.method == "qlora":
            raise ConfigError("method qlora with FSDP2: 4-bit weights lose their quantisation state when FSDP2 "
                              "gathers them; train QLoRA with DDP (distributed_type MULTI_GPU) or on one GPU")
        if config.method not in FSDP2_METHODS:
            raise ConfigError(f"method {config.method} with FSDP2 is not tested yet (FSDP2 trains "
                              f"{' and '.join(FSDP2_METHODS)}); train it with DDP (distributed_type MULTI_GPU)")
        if config.task not in FSDP2_TASKS:
            raise ConfigError(f"task {config.task} with FSDP2 is not tested yet (FSDP2 trains tasks "
                              f"{' and '.join(FSDP2_TASKS)}); train it with DDP (distributed_type MULTI_GPU)")

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` wrapped for the engine (DDP, FSDP2); itself on one process. Under FSDP2 the parameters are
        replaced by sharded ones: build the optimizer afterwards, over ``module.parameters()``."""
        if not self.enabled:
            return module
        if self.sharded:
            from accelerate.utils import fsdp2_prepare_model  # type: ignore[import-untyped]

            # the model half of Accelerator.prepare(model, optimizer) under FSDP2 (its prepare_model refuses
            # FSDP2): the auto-wrap policy of the accelerate config, fully_shard per layer, then the root
            from torch.distributed.fsdp import FSDPModule
            from torch.distributed.tensor import DTensor

            wrapped = fsdp2_prepare_model(self.accelerator, module)
            params = list(wrapped.parameters())
            log.info("FSDP2: %d of %d parameter tensors sharded over %d processes, in %d groups",
                     sum(isinstance(p, DTensor) for p in params), len(params), self.world,
                     sum(isinstance(m, FSDPModule) for m in wrapped.modules()))
            return wrapped
        return self.accelerator.prepare_model(module)

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """torch's ``clip_grad_norm_``; returns the norm of the whole gradient. Under FSDP2 each process holds
        a shard of each gradient (a DTensor): the shards' norms are reduced into the full norm, one process's."""
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        from torch.distributed.tensor import DTensor

        total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def run(self, wrapped: torch.nn.Module | None, model: torch.nn.Module, fn: Any) -> Any:
        """``fn(model)``, e.g. an evaluation. Under FSDP2 inside the root's forward (where the root's parameters
        are gathered; every process must call it), the parameters resharded after."""
        if not self.sharded:
            return fn(model)
        assert wrapped is not None
        try:
            return wrapped(run=fn)
        finally:
            reshard(wrapped)

    def gathered_state(self, wrapped: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None = None
                       ) -> tuple[dict[str, Any], Any] | None:
        """Under FSDP2: the full state dict of the wrapped model (names as in ``wrapped.model``) and, given
        ``optimizer``, its full state dict (keyed by parameter names), on the CPU of the main process (the
        others get empty dicts). A collective: every process calls it. None when not sharded (each process
        holds the whole model)."""
        if not self.sharded:
            return None
        assert wrapped is not None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

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
        optim = get_optimizer_state_dict(wrapped, optimizer, options=options) if optimizer is not None else None
        return state, optim

    def load_trained(self, wrapped: torch.nn.Module | None, tensors: dict[str, torch.Tensor]) -> None:
        """FSDP2: copy full tensors (names as in ``wrapped.model``) into the sharded parameters, on every process."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        assert wrapped is not None
        reshard(wrapped)
        set_model_state_dict(wrapped, {f"model.{k}": v for k, v in tensors.items()},
                             options=StateDictOptions(full_state_dict=True, strict=False))

    def load_optimizer(self, wrapped: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None,
                       state: dict[str, Any]) -> None:
        """FSDP2: load what :meth:`gathered_state` saved of the optimizer, sharded, on every process."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        assert wrapped is not None and optimizer is not None
        set_optimizer_state_dict(wrapped, optimizer, state, options=StateDictOptions(full_state_dict=True))

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
    from accelerate.utils import DistributedType

    from tuneforge.config import ConfigError

    # from what `accelerate launch` put in the environment, before accelerate builds its plugins (its FSDP1
    # and DeepSpeed plugins fail on machines without GPUs or without deepspeed)
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise _deepspeed_refused()
    if _flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise _fsdp1_refused(os.environ.get("FSDP_VERSION", "1"))
    accelerator = Accelerator(cpu=cpu)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise _deepspeed_refused()
    fsdp = accelerator.distributed_type == DistributedType.FSDP or _flag("ACCELERATE_USE_FSDP")
    if fsdp and accelerator.distributed_type != DistributedType.FSDP:
        if not (_flag(FSDP_ON_CPU_FOR_TESTS) and accelerator.distributed_type == DistributedType.MULTI_CPU):
            # on CPUs accelerate runs an FSDP request as DDP (device cpu), or as independent processes (device auto)
            raise ConfigError("accelerate is set up for FSDP: tuneforge train runs DDP on CPUs (accelerate turns "
                              "FSDP on only on GPUs); use an accelerate config with distributed_type MULTI_CPU here, "
                              "FSDP on GPUs, or `tuneforge plan --accelerate-config` to size one")
        _fsdp_on_cpu_for_tests(accelerator)
    if fsdp:
        _check_fsdp_plugin(accelerator)
    launched = int(os.environ["WORLD_SIZE"])
    if accelerator.num_processes != launched:
        # e.g. accelerate's FSDP plugin on a machine without GPUs falls back to DistributedType.NO: every process
        # would train alone and write the same run directory
        raise ConfigError(f"{launched} processes were launched but accelerate set up {accelerator.num_processes} "
                          f"({accelerator.distributed_type.value}); FSDP and DeepSpeed need GPUs: on CPUs use DDP "
                          "(torchrun, or an accelerate config with distributed_type MULTI_CPU)")
    return Distributed(accelerator, accelerator.process_index, accelerator.num_processes, sharded=fsdp)


def _deepspeed_refused() -> Exception:
    from tuneforge.config import ConfigError

    return ConfigError("accelerate is set up for DeepSpeed: tuneforge train runs DDP and FSDP2 across processes "
                       "(DeepSpeed is not tested yet); use an accelerate config with distributed_type MULTI_GPU, "
                       "or FSDP with fsdp_version: 2, or `tuneforge plan --accelerate-config` to size one")


def _fsdp1_refused(version: Any) -> Exception:
    from tuneforge.config import ConfigError

    return ConfigError(f"accelerate is set up for FSDP version {version}: tuneforge train runs FSDP2; set "
                       "fsdp_version: 2 in the accelerate config's fsdp_config (as examples/distributed/fsdp_1x8.yaml)")


def _fsdp_on_cpu_for_tests(accelerator: Any) -> None:
    """Test-only (``TUNEFORGE_TEST_FSDP_ON_CPU=1``): on CPUs, what accelerate's state does for an FSDP request on
    GPUs (``AcceleratorState.__init__``: ``distributed_type`` FSDP, with the plugin built from the ``FSDP_*``
    environment), so that accelerate's own FSDP2 code runs on gloo. Users never need it: on GPUs accelerate
    does this itself."""
    from accelerate.state import PartialState  # type: ignore[import-untyped]
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if accelerator.state.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.state.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if accelerator.is_main_process:
        log.warning("%s: accelerate's FSDP path forced on CPUs (gloo): for tests only", FSDP_ON_CPU_FOR_TESTS)


def _check_fsdp_plugin(accelerator: Any) -> None:
    """Refuse (one line) the FSDP settings tuneforge train is not proven with; drop the one it does not use."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    from tuneforge.config import ConfigError

    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise _fsdp1_refused(plugin.fsdp_version)
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


class ObjectiveModule(torch.nn.Module):
    """The model and the objective's loss as one module, so a DDP/FSDP wrapper runs forward, LM head and loss
    inside its hooks: ``wrapped(batch)`` returns the objective's :class:`ObjectiveOutput`. ``wrapped(run=fn)``
    returns ``fn(model)`` computed inside the wrapper's forward (FSDP2: evaluation, see :meth:`Distributed.run`)."""

    def __init__(self, model: torch.nn.Module, objective: Any, config: Any):
        super().__init__()
        self.model = model
        self.objective = objective
        self.config = config
        # the model's layer classes: what accelerate's TRANSFORMER_BASED_WRAP shards one by one when the
        # accelerate config names none (peft's wrapper passes the attribute on from the base model)
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, batch: Any = None, run: Any = None) -> Any:
        if run is not None:
            return run(self.model)
        return self.objective.loss(self.model, batch, self.config)


def save_gathered(model: torch.nn.Module, folder: Any, state_dict: dict[str, Any]) -> None:
    """``save_trained``'s files from a gathered full state dict (FSDP2, whose model holds only shards). The
    methods FSDP2 trains (:data:`FSDP2_METHODS`) save through ``save_pretrained`` (peft's for ``lora``,
    transformers' for ``full``), which writes the state dict it is given instead of the model's own."""
    cast(Any, model).save_pretrained(str(folder), safe_serialization=True, state_dict=state_dict)


def reshard(wrapped: torch.nn.Module) -> None:
    """FSDP2: every parameter back to its shard (``FSDPModule.reshard`` of each sharded module; the root keeps
    its parameters gathered after a forward that no backward follows, such as an evaluation)."""
    from torch.distributed.fsdp import FSDPModule

    for module in wrapped.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
