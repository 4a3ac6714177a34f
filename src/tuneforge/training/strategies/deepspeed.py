"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate (``distributed_type: DEEPSPEED``).

* The engine owns more of the step: :meth:`DeepSpeed.setup` hands accelerate the module and tuneforge's AdamW
  (``Accelerator.prepare``, i.e. ``deepspeed.initialize``), with the run config's micro-batch size, gradient
  accumulation and clipping written into the DeepSpeed config. Every micro-batch then goes through
  ``engine.backward`` (the loss already scaled as under DDP, so ``scale_wrt_gas=False``) and ``engine.step``;
  at the step's last micro-batch the engine reduces the gradient partitions, clips and steps (a non-finite
  gradient skips the step, which the loop then reports as its own policy says). tuneforge's scheduler still
  steps once per optimizer step: ZeRO keeps AdamW's parameter groups (and their ``lr``), with its own flat
  partitions in them.
* ZeRO-3 partitions the parameters too: its hooks gather each module's parameters when it runs, so evaluation
  calls the model directly on every process; saving gathers the trained parameters
  (``deepspeed.zero.GatheredParameters``); the chunked loss, which uses the LM head's weight outside the head's
  forward, is off; activation checkpointing is torch's reentrant kind.
* A checkpoint's optimizer state is DeepSpeed's own (``engine.save_checkpoint``, each process writing its
  partition into the checkpoint folder before the main process completes it; the frozen base weights left out),
  loaded by ``engine.load_checkpoint``: resume with the same launch (ZeRO stage and process count).
  ``trainer_state.pt`` keeps the rest (scheduler, counters, RNG) as on one process.
* The model is loaded whole on every process and then partitioned (accelerate's ``zero3_init_flag``, loading
  straight into partitions through transformers, is turned off, as FSDP2's ``cpu_ram_efficient_loading``).
* Proven for ``lora`` on ``sft`` / ``pretrain`` (``tests/test_distributed_deepspeed.py``: the methods whose record
  lists ``deepspeed``, :mod:`tuneforge.methods.engines`); the rest, ZeRO-1,
  offloading, fp16 and a DeepSpeed config with its own optimizer or scheduler are refused with one line.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import torch

from tuneforge.training.strategies.base import BuildOptimizer, Gathered, ObjectiveModule, Parallel, trained_parameters

log = logging.getLogger(__name__)

# what DeepSpeed is proven to train (tests/test_distributed_deepspeed.py): ZeRO stages 2 and 3 (its methods: the
# records' engines)
DEEPSPEED_STAGES = (2, 3)
DEEPSPEED_TASKS = ("sft", "pretrain")
DEEPSPEED_FOLDER = "deepspeed"      # a checkpoint's DeepSpeed state (each process's optimizer partition)
DEEPSPEED_TAG = "zero"


class DeepSpeed(Parallel):
    """The engine (``deepspeed.initialize``'s) steps, clips and holds the optimizer's partitions."""

    engine = "deepspeed"

    @property
    def precision_by_engine(self) -> bool:
        return True

    def __init__(self, accelerator: Any, rank: int, world: int, stage: int) -> None:
        super().__init__(accelerator, rank, world)
        self.stage = stage                 # ZeRO's stage: 2 (gradients and optimizer state split), 3 (weights too)

    @property
    def launch(self) -> str:
        return f"DeepSpeed ZeRO-{self.stage} on {self.world} processes"

    @staticmethod
    def saved_launch(optimizer_state: dict[str, Any]) -> str | None:
        """``launch`` of the run that saved ``optimizer_state``, if DeepSpeed did (:meth:`gather`'s record)."""
        if optimizer_state.get("engine") != "deepspeed":
            return None
        return f"DeepSpeed ZeRO-{optimizer_state.get('zero_stage')} on {optimizer_state.get('processes')} processes"

    @property
    def reentrant_checkpointing(self) -> bool:
        # ZeRO-3's parameter gathering changes what the non-reentrant kind sees saved between forward and
        # recomputation
        return self.stage == 3

    def check(self, config: Any) -> None:
        """Refuse, with one line, what DeepSpeed is not proven to train (a method whose record does not list
        ``deepspeed``, :data:`DEEPSPEED_TASKS`, ...); ZeRO-3 turns ``chunked_loss: auto`` and
        ``lora.shared_dropout_mask`` off."""
        from tuneforge.errors import ConfigError

        zero = f"DeepSpeed ZeRO-{self.stage}"
        super().check(config)
        if config.task not in DEEPSPEED_TASKS:
            raise ConfigError(f"task {config.task} with DeepSpeed is not tested yet (DeepSpeed trains tasks "
                              f"{' and '.join(DEEPSPEED_TASKS)}); train it with DDP (distributed_type MULTI_GPU)")
        if config.init_from:
            raise ConfigError(f"init_from with {zero} is not tested yet; train it with DDP (distributed_type "
                              "MULTI_GPU) or on one process")
        if self.stage == 3 and config.lora.use_dora:
            raise ConfigError(f"lora.use_dora with {zero} is not tested yet (DoRA reads the partitioned base "
                              "weights outside their forward); use ZeRO-2, DDP or FSDP2")
        if self.stage == 3 and config.lora.shared_dropout_mask:     # read by the LoRA layers only
            # ZeRO-3's module hooks hand q/k/v (gate/up) each its own input tensor, so a shared group stops sharing
            # during the first step (methods/lora/layer.py): a resumed run's first step would then be computed
            # otherwise than the uninterrupted run's (1-ulp differences, measured), and resume would not be exact
            config.lora.shared_dropout_mask = False
            if self.is_main:
                log.info("%s: lora.shared_dropout_mask -> false (its hooks give each projection its own input)", zero)
        if self.stage == 3 and config.chunked_loss != "off":
            if config.chunked_loss == "on":
                raise ConfigError(f"chunked_loss: on with {zero}: the chunked loss uses the LM head's weight outside "
                                  "the head's forward, where ZeRO-3 holds only its partition; set chunked_loss: off "
                                  "(or auto), or use ZeRO-2")
            config.chunked_loss = "off"
            if self.is_main:
                log.info("%s: chunked_loss auto -> off (ZeRO-3 gathers the LM head's weight only inside its "
                         "forward)", zero)

    def setup(self, build_optimizer: BuildOptimizer) -> torch.optim.Optimizer:
        """accelerate's ``prepare(module, optimizer)`` under DeepSpeed (``deepspeed.initialize``): the optimizer
        first (ZeRO partitions its state), with the run config's micro-batch size, accumulation and clipping in
        the DeepSpeed config."""
        config = self.config
        module = ObjectiveModule(self.model, self.objective, config)
        optimizer = build_optimizer(config, trained_parameters(self.model))
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
        self.wrapped, _ = self.accelerator.prepare(module, optimizer)
        if self.is_main:
            log.info("DeepSpeed ZeRO-%d over %d processes: micro-batch %d, %d accumulation steps, clipping %s",
                     self.stage, self.world, config.batch_size, config.gradient_accumulation_steps,
                     config.max_grad_norm or "off")
        return optimizer

    @contextlib.contextmanager
    def no_sync(self, skip: bool) -> Iterator[None]:
        """Nothing: the engine knows the step's last micro-batch itself."""
        yield

    def backward(self, loss: torch.Tensor) -> None:
        """The engine's backward and step (it counts micro-batches: at the optimizer step's last it reduces the
        gradients, clips and steps)."""
        engine = cast(Any, self.wrapped)
        engine.backward(loss, scale_wrt_gas=False)       # the loop scaled the loss to the step's normaliser
        engine.step()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The engine has clipped already (at the step's last micro-batch): its norm (NaN: none measured)."""
        norm = cast(Any, self.wrapped).get_global_grad_norm()
        return torch.as_tensor(math.nan if norm is None else norm, dtype=torch.float32).detach().cpu()

    def optimizer_step(self) -> None:
        """Nothing: the engine stepped (or skipped a non-finite step) and cleared the gradients in :meth:`backward`."""

    def zero_grad(self) -> None:
        pass

    def gather(self, with_optimizer: bool) -> Gathered:
        """The trained parameters (gathered under ZeRO-3) and, ``with_optimizer``, a record of the engine whose
        checkpoint holds the optimizer's state (:meth:`save_engine_state`). A collective."""
        model = cast(Any, self.wrapped).module.model
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        gather: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.stage == 3:
            import deepspeed  # type: ignore[import-untyped]

            gather = deepspeed.zero.GatheredParameters([p for _, p in trained], modifier_rank=None)
        with gather:
            weights = {n: p.detach().cpu().clone() for n, p in trained}
        record = {"engine": "deepspeed", "zero_stage": self.stage, "processes": self.world} if with_optimizer else None
        return Gathered(self.model, self.config, weights, record)

    def save_engine_state(self, folder: Path) -> None:
        """Every process writes its optimizer partition (and the trained weights) into ``folder/deepspeed``."""
        cast(Any, self.wrapped).save_checkpoint(str(folder / DEEPSPEED_FOLDER), tag=DEEPSPEED_TAG, save_latest=False,
                                                exclude_frozen_parameters=True)

    def load_trained(self, folder: Path, read: Callable[[str], torch.Tensor], names: set[str]) -> None:
        """The engine's own checkpoint: the trained weights and each process's optimizer partition from
        ``folder/deepspeed``."""
        from tuneforge.errors import ConfigError

        path, _ = cast(Any, self.wrapped).load_checkpoint(str(folder / DEEPSPEED_FOLDER), tag=DEEPSPEED_TAG,
                                                          load_module_strict=False, load_optimizer_states=True,
                                                          load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"--resume: {folder / DEEPSPEED_FOLDER} holds no DeepSpeed state to resume from")

    def load_optimizer(self, state: dict[str, Any]) -> None:
        """Nothing: :meth:`load_trained` loaded it with the engine's checkpoint."""


def check_installed() -> None:
    from importlib.util import find_spec

    from tuneforge.errors import ConfigError

    if find_spec("deepspeed") is None:
        raise ConfigError("accelerate is set up for DeepSpeed but deepspeed is not installed: "
                          "pip install 'tuneforge[deepspeed]'")


def check_plugin(accelerator: Any) -> int:
    """Refuse (one line) the DeepSpeed settings tuneforge train is not proven with; returns the ZeRO stage."""
    from tuneforge.errors import ConfigError

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
