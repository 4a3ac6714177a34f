"""Training on several processes through accelerate: which engine runs this launch, and how the loop shares work.

``accelerate launch`` (or ``torchrun``) starts ``tuneforge train CONFIG`` once per process; the environment
(``WORLD_SIZE``, ``RANK``, ...) says so, and :func:`setup_distributed` then creates accelerate's
``Accelerator``, which owns the process group (NCCL on GPUs, gloo on CPUs), and returns the strategy of the
engine the launch asked for (``training/strategies/``: one process, DDP, FSDP2, DeepSpeed ZeRO-2/3, each behind
the same small interface). tuneforge has no process-group or sharding code of its own. Supported and tested
today: DDP (``tests/test_distributed.py``: 2 processes on CPU with gloo end with the 1-process parameters),
FSDP2 (accelerate's ``fsdp_version: 2``, i.e. torch's ``fully_shard``) for ``lora`` and ``full`` on the
``sft``/``pretrain`` objectives (``tests/test_distributed_fsdp.py``, same proof), and DeepSpeed ZeRO-2 and
ZeRO-3 (accelerate's ``distributed_type: DEEPSPEED``) for ``lora`` on the same objectives
(``tests/test_distributed_deepspeed.py``, same proof). DDP also trains ``task: grpo``
(``tests/test_grpo_distributed.py``, same proof, samples included). FSDP1 and the combinations not tested (QLoRA,
other methods, preference or GRPO training under FSDP2 or DeepSpeed, offloading, ...) are refused with one line.

What the loop does with it (``training/trainer.py``):

* Every process draws the same micro-batches of an optimizer step from the same seeded stream
  (``world x gradient_accumulation_steps`` of them) and trains on its share ``rank::world``; so every process
  runs the same number of micro-batches (DDP would hang otherwise), the data cursor is the same everywhere
  (resume needs no per-rank state) and the step's normaliser (target tokens, or pairs) is summed over all
  of them without communication. An objective whose normaliser is work only the process training the micro-batch
  should do (GRPO's rollout: ``Objective.local_normaliser``) is asked for its own share's, summed over the processes
  (one all-reduce).
* The objective's loss runs inside the wrapped module (:class:`~tuneforge.training.strategies.ObjectiveModule`:
  forward, LM head and loss in one ``forward``), so DDP's hooks see every parameter that gets a gradient;
  gradients are synchronised on the last micro-batch only (``no_sync`` before). DDP averages gradients over
  processes, so each process scales its loss sum by ``world / normaliser``: the result is the gradient of the
  step's total loss over its total normaliser, as on one process.
* The scheduler is tuneforge's own and steps once per optimizer step (never accelerate's wrapped scheduler,
  which steps once per process); the optimizer is not wrapped either (its state is saved as on one process).
* Files (checkpoints, metrics, run.json, plots) are written by the main process only, with barriers; the
  logged loss is reduced over processes.

What FSDP2 and DeepSpeed change is their strategy's (``strategies/fsdp2.py``, ``strategies/deepspeed.py``).

* accelerate turns FSDP on only on GPUs (on CPUs an FSDP config runs as DDP). For tests only,
  ``TUNEFORGE_TEST_FSDP_ON_CPU=1`` with an FSDP2 request on CPUs puts accelerate's state into FSDP mode with the
  plugin accelerate would have built (``FSDP_*`` environment), so that the same accelerate code path runs on
  gloo; :data:`FSDP_ON_CPU_FOR_TESTS`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from tuneforge.training.strategies import DDP, FSDP2, DeepSpeed, SingleProcess, Strategy
from tuneforge.training.strategies import deepspeed as deepspeed_strategy
from tuneforge.training.strategies import fsdp2 as fsdp2_strategy

log = logging.getLogger(__name__)

# test-only switch: run accelerate's FSDP2 path on CPUs (gloo), where accelerate itself would run DDP
FSDP_ON_CPU_FOR_TESTS = "TUNEFORGE_TEST_FSDP_ON_CPU"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def launched_distributed() -> bool:
    """Whether this process was started by ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_distributed(cpu: bool = False) -> Strategy:
    """The strategy of this process's launch: :class:`SingleProcess` when not launched, else, from accelerate's
    state, :class:`DDP`, :class:`FSDP2` or :class:`DeepSpeed` (the launch's settings not tested refused in one
    line)."""
    if not launched_distributed():
        return SingleProcess()
    from accelerate import Accelerator  # type: ignore[import-untyped]
    from accelerate.utils import DistributedType, InitProcessGroupKwargs  # type: ignore[import-untyped]

    from tuneforge.errors import ConfigError

    # from what `accelerate launch` put in the environment, before accelerate builds its plugins (its FSDP1
    # plugin fails on machines without GPUs, its DeepSpeed plugin without deepspeed)
    deepspeed = _flag("ACCELERATE_USE_DEEPSPEED")
    if deepspeed:
        deepspeed_strategy.check_installed()
        if cpu and torch.cuda.is_available():
            raise ConfigError("device: cpu with DeepSpeed on a machine with GPUs: DeepSpeed trains on the GPUs; "
                              "remove device: cpu, or launch DDP (distributed_type MULTI_CPU) to train on CPUs")
    if _flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise fsdp2_strategy.fsdp1_refused(os.environ.get("FSDP_VERSION", "1"))
    # accelerate runs DeepSpeed only when not told cpu=True; on a machine without GPUs it has no backend to name,
    # so it is told gloo (which DeepSpeed's own CPU accelerator uses)
    handlers = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and not torch.cuda.is_available() else []
    accelerator = Accelerator(cpu=cpu and not deepspeed, kwargs_handlers=handlers)
    zero_stage = 0
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        zero_stage = deepspeed_strategy.check_plugin(accelerator)
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
        fsdp2_strategy.check_plugin(accelerator)
    launched = int(os.environ["WORLD_SIZE"])
    if accelerator.num_processes != launched:
        # e.g. accelerate's FSDP plugin on a machine without GPUs falls back to DistributedType.NO: every process
        # would train alone and write the same run directory
        raise ConfigError(f"{launched} processes were launched but accelerate set up {accelerator.num_processes} "
                          f"({accelerator.distributed_type.value}); FSDP needs GPUs: on CPUs use DDP "
                          "(torchrun, or an accelerate config with distributed_type MULTI_CPU)")
    rank, world = accelerator.process_index, accelerator.num_processes
    if zero_stage:
        return DeepSpeed(accelerator, rank, world, zero_stage)
    return FSDP2(accelerator, rank, world) if fsdp else DDP(accelerator, rank, world)


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

