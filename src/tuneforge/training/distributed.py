"""Training on several processes through accelerate: what the loop needs to know, in one place.

``accelerate launch`` (or ``torchrun``) starts ``tuneforge train CONFIG`` once per process; the environment
(``WORLD_SIZE``, ``RANK``, ...) says so, and :func:`setup_distributed` then creates accelerate's
``Accelerator``, which owns the process group (NCCL on GPUs, gloo on CPUs) and wraps the model for the
chosen engine. tuneforge has no process-group or sharding code of its own. Supported and tested today:
DDP (``tests/test_distributed.py``: 2 processes on CPU with gloo end with the 1-process parameters) and
FSDP2 (accelerate's ``fsdp_version: 2``, i.e. torch's ``fully_shard``) for ``lora`` and ``full`` on the
``sft``/``pretrain`` objectives (``tests/test_distributed_fsdp.py``, same proof), and DeepSpeed ZeRO-2 and
ZeRO-3 (accelerate's ``distributed_type: DEEPSPEED``) for ``lora`` on the same objectives
(``tests/test_distributed_deepspeed.py``, same proof). FSDP1 and the combinations not tested (QLoRA, other
methods, preference training, offloading, ...) are refused with one line.

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
What DeepSpeed changes (``Distributed.zero_stage``):

* The engine owns more of the step: :meth:`Distributed.prepare` hands accelerate the module and tuneforge's
  AdamW (``Accelerator.prepare``, i.e. ``deepspeed.initialize``), with the run config's micro-batch size,
  gradient accumulation and clipping written into the DeepSpeed config. Every micro-batch then goes through
  ``engine.backward`` (the loss already scaled as under DDP, so ``scale_wrt_gas=False``) and ``engine.step``;
  at the step's last micro-batch the engine reduces the gradient partitions, clips and steps (a non-finite
  gradient skips the step, which the loop then reports as its own policy says). tuneforge's scheduler still
  steps once per optimizer step: ZeRO keeps AdamW's parameter groups (and their ``lr``), with its own flat
  partitions in them.
* ZeRO-3 partitions the parameters too: its hooks gather each module's parameters when it runs, so
  evaluation calls the model directly on every process; saving gathers the trained parameters
  (``deepspeed.zero.GatheredParameters``); the chunked loss, which uses the LM head's weight outside the
  head's forward, is off.
* A checkpoint's optimizer state is DeepSpeed's own (``engine.save_checkpoint``, each process writing its
  partition into the checkpoint folder before the main process completes it; the frozen base weights left
  out), loaded by ``engine.load_checkpoint``: resume with the same launch (ZeRO stage and process count).
  ``trainer_state.pt`` keeps the rest (scheduler, counters, RNG) as on one process.
* The model is loaded whole on every process and then partitioned (accelerate's ``zero3_init_flag``, loading
  straight into partitions through transformers, is turned off, as FSDP2's ``cpu_ram_efficient_loading``).

* accelerate turns FSDP on only on GPUs (on CPUs an FSDP config runs as DDP). For tests only,
  ``TUNEFORGE_TEST_FSDP_ON_CPU=1`` with an FSDP2 request on CPUs puts accelerate's state into FSDP mode with the
  plugin accelerate would have built (``FSDP_*`` environment), so that the same accelerate code path runs on
  gloo; :data:`FSDP_ON_CPU_FOR_TESTS`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

log = logging.getLogger(__name__)

# test-only switch: run accelerate's FSDP2 path on CPUs (gloo), where accelerate itself would run DDP
FSDP_ON_CPU_FOR_TESTS = "TUNEFORGE_TEST_FSDP_ON_CPU"
# what FSDP2 is proven to train (tests/test_distributed_fsdp.py); the rest is refused with one line
FSDP2_METHODS = ("lora", "full")
FSDP2_TASKS = ("sft", "pretrain")
# what DeepSpeed is proven to train (tests/test_distributed_deepspeed.py): ZeRO stages 2 and 3, LoRA
DEEPSPEED_STAGES = (2, 3)
DEEPSPEED_METHODS = ("lora",)
DEEPSPEED_TASKS = ("sft", "pretrain")
DEEPSPEED_FOLDER = "deepspeed"      # a checkpoint's DeepSpeed state (each process's optimizer partition)
DEEPSPEED_TAG = "zero"


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
    zero_stage: int = 0            # DeepSpeed's ZeRO stage (2, 3); 0 when the engine is not DeepSpeed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage > 0

    def launch_of(self, optimizer_state: dict[str, Any] | None = None) -> str:
        """What a checkpoint's optimizer state depends on, in words: of this run, or of a saved
        ``optimizer_state`` (FSDP2 keys it by parameter names; DeepSpeed's record names stage and processes;
        one process and DDP save alike)."""
        stage: Any
        processes: Any
        if optimizer_state is None:
            engine, stage, processes = ("fsdp2" if self.sharded else "deepspeed" if self.deepspeed else None,
                                        self.zero_stage, self.world)
        else:
            by_name = any(isinstance(p, str) for g in optimizer_state.get("param_groups", []) for p in g["params"])
            engine = optimizer_state.get("engine") or ("fsdp2" if by_name else None)
            stage, processes = optimizer_state.get("zero_stage"), optimizer_state.get("processes")
        if engine == "deepspeed":
            return f"DeepSpeed ZeRO-{stage} on {processes} processes"
        return "FSDP2" if engine == "fsdp2" else "neither FSDP2 nor DeepSpeed"

    def optimizer_loader(self, wrapped: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None) -> Any:
        """How :meth:`TrainState.load_state_dict` loads the optimizer's saved state: None for
        ``optimizer.load_state_dict``; FSDP2 into the shards; DeepSpeed not at all (:meth:`load_engine_state`
        loaded it with the engine's checkpoint)."""
        if self.sharded:
            return lambda state: self.load_optimizer(wrapped, optimizer, state)
        if self.deepspeed:
            return lambda state: None
        return None

    def device(self) -> torch.device | None:
        return self.accelerator.device if self.accelerator is not None else None

    def check(self, config: Any) -> None:
        """Refuse, with one line, a run this engine is not proven to train (FSDP2: see :data:`FSDP2_METHODS`;
        DeepSpeed: :data:`DEEPSPEED_METHODS`)."""
        if self.deepspeed:
            self._check_deepspeed(config)
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

    def _check_deepspeed(self, config: Any) -> None:
        from tuneforge.config import ConfigError

        zero = f"DeepSpeed ZeRO-{self.zero_stage}"
        if config.method not in DEEPSPEED_METHODS:
            raise ConfigError(f"method {config.method} with DeepSpeed is not tested yet (DeepSpeed trains "
                              f"{' and '.join(DEEPSPEED_METHODS)}); train it with DDP (distributed_type MULTI_GPU)"
                              + (" or FSDP2" if config.method in FSDP2_METHODS else ""))
        if config.task not in DEEPSPEED_TASKS:
            raise ConfigError(f"task {config.task} with DeepSpeed is not tested yet (DeepSpeed trains tasks "
                              f"{' and '.join(DEEPSPEED_TASKS)}); train it with DDP (distributed_type MULTI_GPU)")
        if self.zero_stage == 3 and config.lora.use_dora:
            raise ConfigError(f"lora.use_dora with {zero} is not tested yet (DoRA reads the partitioned base "
                              "weights outside their forward); use ZeRO-2, DDP or FSDP2")
        if self.zero_stage == 3 and config.chunked_loss != "off":
            if config.chunked_loss == "on":
                raise ConfigError(f"chunked_loss: on with {zero}: the chunked loss uses the LM head's weight outside "
                                  "the head's forward, where ZeRO-3 holds only its partition; set chunked_loss: off "
                                  "(or auto), or use ZeRO-2")
            config.chunked_loss = "off"
            if self.is_main:
                log.info("%s: chunked_loss auto -> off (ZeRO-3 gathers the LM head's weight only inside its "
                         "forward)", zero)

    def prepare(self, module: torch.nn.Module, build_optimizer: Any, config: Any
                ) -> tuple[torch.nn.Module | None, torch.optim.Optimizer]:
        """The engine's wrapper of ``module`` (None on one process) and the optimizer ``build_optimizer()``
        returns, built in the order the engine needs: FSDP2 replaces the parameters by shards first (the
        optimizer is built over the shards); DeepSpeed takes the optimizer along (ZeRO partitions its state)."""
        if not self.enabled:
            return None, build_optimizer()
        if self.deepspeed:
            optimizer = build_optimizer()
            return self._deepspeed_initialize(module, optimizer, config), optimizer
        wrapped = self.wrap(module)
        return wrapped, build_optimizer()

    def _deepspeed_initialize(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              config: Any) -> torch.nn.Module:
        """accelerate's ``prepare(module, optimizer)`` under DeepSpeed (``deepspeed.initialize``), with the run
        config's micro-batch size, accumulation and clipping in the DeepSpeed config."""
        plugin = self.accelerator.state.deepspeed_plugin
        ds = plugin.deepspeed_config
        accumulation = ds.get("gradient_accumulation_steps")
        if accumulation not in (None, "auto", config.gradient_accumulation_steps) and self.is_main:
            log.info("DeepSpeed: gradient_accumulation_steps %d from the run config (the accelerate/DeepSpeed "
                     "config's %s is not used)", config.gradient_accumulation_steps, accumulation)
        ds["train_micro_batch_size_per_gpu"] = config.batch_size
        ds["gradient_accumulation_steps"] = config.gradient_accumulation_steps
        ds["train_batch_size"] = config.batch_size * config.gradient_accumulation_steps * self.world
        ds["gradient_clipping"] = float(config.max_grad_norm or 0.0)        # 0: no clipping
        self.accelerator.gradient_accumulation_steps = config.gradient_accumulation_steps
        engine, _ = self.accelerator.prepare(module, optimizer)
        if self.is_main:
            log.info("DeepSpeed ZeRO-%d over %d processes: micro-batch %d, %d accumulation steps, clipping %s",
                     self.zero_stage, self.world, config.batch_size, config.gradient_accumulation_steps,
                     config.max_grad_norm or "off")
        return engine

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

    def backward(self, wrapped: torch.nn.Module | None, loss: torch.Tensor) -> None:
        """``loss.backward()``; under DeepSpeed the engine's backward and step (it counts micro-batches: at the
        optimizer step's last it reduces the gradients, clips and steps)."""
        if not self.deepspeed:
            loss.backward()
            return
        engine = cast(Any, wrapped)
        engine.backward(loss, scale_wrt_gas=False)       # the loop scaled the loss to the step's normaliser
        engine.step()

    def clip_grad_norm(self, wrapped: torch.nn.Module | None, params: list[torch.nn.Parameter],
                       max_norm: float) -> torch.Tensor:
        """torch's ``clip_grad_norm_``; returns the norm of the whole gradient. Under FSDP2 each process holds
        a shard of each gradient (a DTensor): the shards' norms are reduced into the full norm, one process's.
        Under DeepSpeed the engine has clipped already (at the step's last micro-batch): its norm."""
        if self.deepspeed:
            norm = cast(Any, wrapped).get_global_grad_norm()
            return torch.as_tensor(math.nan if norm is None else norm, dtype=torch.float32).detach().cpu()
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        from torch.distributed.tensor import DTensor

        total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's step and the gradients cleared (DeepSpeed's engine did both in :meth:`backward`)."""
        if not self.deepspeed:
            optimizer.step()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.deepspeed:
            optimizer.zero_grad(set_to_none=True)

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
        others get empty dicts). Under DeepSpeed: the trained parameters (gathered under ZeRO-3) and, given
        ``optimizer``, a record of the engine whose checkpoint holds its state (:meth:`save_engine_state`).
        A collective: every process calls it. None otherwise (each process holds the whole model)."""
        if self.deepspeed:
            return self._deepspeed_trained(wrapped), (
                {"engine": "deepspeed", "zero_stage": self.zero_stage, "processes": self.world}
                if optimizer is not None else None)
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

    def _deepspeed_trained(self, wrapped: torch.nn.Module | None) -> dict[str, torch.Tensor]:
        model = cast(Any, wrapped).module.model
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        gather = contextlib.nullcontext()
        if self.zero_stage == 3:
            import deepspeed  # type: ignore[import-untyped]

            gather = deepspeed.zero.GatheredParameters([p for _, p in trained], modifier_rank=None)
        with gather:
            return {n: p.detach().cpu().clone() for n, p in trained}

    def save_engine_state(self, wrapped: torch.nn.Module | None, folder: Path) -> None:
        """DeepSpeed: every process writes its optimizer partition (and the trained weights) into
        ``folder/deepspeed``. A collective; nothing to do for the other engines (the main process saves their
        whole state)."""
        if self.deepspeed:
            cast(Any, wrapped).save_checkpoint(str(folder / DEEPSPEED_FOLDER), tag=DEEPSPEED_TAG, save_latest=False,
                                               exclude_frozen_parameters=True)

    def load_engine_state(self, wrapped: torch.nn.Module | None, folder: Path) -> None:
        """DeepSpeed: the trained weights and each process's optimizer partition from ``folder/deepspeed``."""
        from tuneforge.config import ConfigError

        path, _ = cast(Any, wrapped).load_checkpoint(str(folder / DEEPSPEED_FOLDER), tag=DEEPSPEED_TAG,
                                                     load_module_strict=False, load_optimizer_states=True,
                                                     load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"--resume: {folder / DEEPSPEED_FOLDER} holds no DeepSpeed state to resume from")

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value``, on every process."""
        if not self.enabled:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

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
        """No gradient synchronisation inside the block when ``skip`` (every micro-batch but the step's last).
        DeepSpeed's engine knows the step's last micro-batch itself."""
        if self.enabled and skip and not self.deepspeed:
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
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    from tuneforge.config import ConfigError

    # from what `accelerate launch` put in the environment, before accelerate builds its plugins (its FSDP1
    # plugin fails on machines without GPUs, its DeepSpeed plugin without deepspeed)
    deepspeed = _flag("ACCELERATE_USE_DEEPSPEED")
    if deepspeed:
        _check_deepspeed_installed()
        if cpu and torch.cuda.is_available():
            raise ConfigError("device: cpu with DeepSpeed on a machine with GPUs: DeepSpeed trains on the GPUs; "
                              "remove device: cpu, or launch DDP (distributed_type MULTI_CPU) to train on CPUs")
    if _flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise _fsdp1_refused(os.environ.get("FSDP_VERSION", "1"))
    # accelerate runs DeepSpeed only when not told cpu=True; on a machine without GPUs it has no backend to name,
    # so it is told gloo (which DeepSpeed's own CPU accelerator uses)
    handlers = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and not torch.cuda.is_available() else []
    accelerator = Accelerator(cpu=cpu and not deepspeed, kwargs_handlers=handlers)
    zero_stage = 0
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        zero_stage = _check_deepspeed_plugin(accelerator)
    elif deepspeed:
        raise ConfigError(f"accelerate is set up for DeepSpeed but started {accelerator.distributed_type.value}; "
                          "launch with `accelerate launch --config_file CONFIG` (distributed_type: DEEPSPEED)")
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
                          f"({accelerator.distributed_type.value}); FSDP needs GPUs: on CPUs use DDP "
                          "(torchrun, or an accelerate config with distributed_type MULTI_CPU)")
    return Distributed(accelerator, accelerator.process_index, accelerator.num_processes, sharded=fsdp,
                       zero_stage=zero_stage)


def _check_deepspeed_installed() -> None:
    from importlib.util import find_spec

    from tuneforge.config import ConfigError

    if find_spec("deepspeed") is None:
        raise ConfigError("accelerate is set up for DeepSpeed but deepspeed is not installed: "
                          "pip install 'tuneforge[deepspeed]'")


def _check_deepspeed_plugin(accelerator: Any) -> int:
    """Refuse (one line) the DeepSpeed settings tuneforge train is not proven with; returns the ZeRO stage."""
    from tuneforge.config import ConfigError

    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage not in DEEPSPEED_STAGES:
        raise ConfigError(f"DeepSpeed ZeRO stage {stage} is not tested with tuneforge train (stages "
                          f"{' and '.join(map(str, DEEPSPEED_STAGES))} are): set zero_stage: 2 or 3")
    for what in ("offload_optimizer", "offload_param"):
        device = (zero.get(what) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ConfigError(f"DeepSpeed {what} to {device} is not tested with tuneforge train: set "
                              f"{what}_device: none")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"the DeepSpeed config has its own \"{key}\" section: tuneforge builds AdamW and the "
                              "learning-rate schedule from the run config (learning_rate, lr_scheduler, ...); "
                              "remove the section")
    if (ds.get("fp16") or {}).get("enabled") in (True, "true"):
        raise ConfigError("DeepSpeed fp16 (loss scaling) is not tested with tuneforge train: use mixed_precision "
                          "bf16 (or no)")
    if stage == 3 and plugin.zero3_init_flag:
        # transformers would build the model straight into partitions (deepspeed.zero.Init); tuneforge loads the
        # model and applies its method on every process, then DeepSpeed partitions it
        from transformers.integrations import unset_hf_deepspeed_config

        plugin.zero3_init_flag = False
        plugin.dschf = None
        unset_hf_deepspeed_config()
        if accelerator.is_main_process:
            log.info("zero3_init_flag is not used: every process loads the model, then ZeRO-3 partitions it")
    return stage


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
        self.run_config = config
        # the model's transformers config, where engines look for it (accelerate fills DeepSpeed's "auto" bucket
        # sizes from config.hidden_size)
        self.config = getattr(model, "config", None)
        # the model's layer classes: what accelerate's TRANSFORMER_BASED_WRAP shards one by one when the
        # accelerate config names none (peft's wrapper passes the attribute on from the base model)
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, batch: Any = None, run: Any = None) -> Any:
        if run is not None:
            return run(self.model)
        return self.objective.loss(self.model, batch, self.run_config)


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
