"""A dry run of a multi-device launch: world size, engine and shard strategy, per-device micro-batch, global
batch and the memory each device needs, from the run config and accelerate's own config file, without GPUs.

``tuneforge plan CONFIG --accelerate-config FILE`` reads the file ``accelerate launch --config_file FILE``
would (``distributed_type``, ``num_machines``, ``num_processes``, ``fsdp_config``, ``deepspeed_config``)
and prices one training step per device with :func:`tuneforge.estimate.memory.estimate_memory`, sharding
what each engine shards:

==========  ===========  ==========  ===========  ===================================================
engine      weights      gradients   optimizer    notes
==========  ===========  ==========  ===========  ===================================================
DDP         full         full x 2    full         DDP's gradient buckets hold a second copy
FSDP        1/N + 2 lay  1/N         1/N          FULL_SHARD; one layer gathered, the next prefetched
ZeRO-2      full         1/N         1/N
ZeRO-3      1/N + 2 lay  1/N         1/N          as FSDP's full shard
==========  ===========  ==========  ===========  ===================================================

Activations and logits are per device (each device runs its own micro-batch). What ``tuneforge train`` runs
(each tested: 2 processes with gloo equal 1 process): DDP; FSDP2 with ``full`` or ``lora``; DeepSpeed ZeRO-2
and ZeRO-3 with ``lora``. Other plans are printed so that users can size machines; ``tuneforge train`` refuses
them with one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from tuneforge.config import RunConfig
from tuneforge.errors import ConfigError
from tuneforge.estimate.memory import GIB, METHODS, estimate_memory
from tuneforge.estimate.shapes import resolve_shape

# what tuneforge train runs under each engine (each engine's training/strategies/ module refuses the rest)
ENGINE_METHODS = {"DDP": None, "FSDP": ("full", "lora"), "ZeRO-2": ("lora",), "ZeRO-3": ("lora",)}


@dataclass
class DistributedPlan:
    engine: str
    method: str
    machines: int
    processes: int
    micro_batch: int
    accumulation: int
    seq: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    overhead: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.processes

    @property
    def per_device(self) -> int:
        return self.weights + self.optimizer_states + self.overhead + max(self.activations, self.gradients)

    @property
    def supported(self) -> bool:
        if self.engine not in ENGINE_METHODS:
            return False
        methods = ENGINE_METHODS[self.engine]
        return methods is None or self.method in methods

    def table(self) -> str:
        rows = [
            ("engine", self.engine + ("" if self.supported else "  (plan only: tuneforge train runs DDP, FSDP2 with "
                                                                "full or lora, ZeRO-2/3 with lora, today)")),
            ("machines x processes", f"{self.machines} x {self.processes // max(1, self.machines)} "
                                     f"= {self.processes} processes"),
            ("micro-batch per device", f"{self.micro_batch} examples of up to {self.seq} tokens, packed"),
            ("accumulation", str(self.accumulation)),
            ("global batch", f"{self.global_batch} examples per optimizer step"),
            ("weights per device", _gib(self.weights)), ("gradients per device", _gib(self.gradients)),
            ("optimizer states per device", _gib(self.optimizer_states)),
            ("activations + logits per device", _gib(self.activations)),
            ("runtime overhead", _gib(self.overhead)),
            ("peak per device", _gib(self.per_device)),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def read_accelerate_config(path: str | Path) -> dict:
    """accelerate's config file (``accelerate config`` writes it) as a dict; one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: accelerate config not found")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(tree, dict) or "distributed_type" not in tree:
        raise ConfigError(f"{p}: not an accelerate config (no 'distributed_type'; write one with `accelerate config`)")
    return tree


def engine_of(tree: dict) -> str:
    """``DDP``, ``FSDP``, ``ZeRO-2``, ``ZeRO-3`` (or ``single``) from an accelerate config."""
    kind = str(tree.get("distributed_type", "NO")).upper()
    if kind in ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU"):
        return "DDP"
    if kind == "FSDP":
        return "FSDP"
    if kind == "DEEPSPEED":
        stage = int((tree.get("deepspeed_config") or {}).get("zero_stage", 2))
        return f"ZeRO-{stage}"
    return "single"


def plan_distributed(config: RunConfig, tree: dict, dtype: str = "bf16", device: str = "cuda") -> DistributedPlan:
    """Per-device memory and batch of ``config`` launched with the accelerate config ``tree``."""
    if config.method not in METHODS:
        raise ConfigError(f"method {config.method!r}: the memory estimator models {', '.join(METHODS)} only")
    engine = engine_of(tree)
    processes = int(tree.get("num_processes", 1))
    machines = int(tree.get("num_machines", 1))
    est = estimate_memory(config.model, config.method, config.data.max_length, config.batch_size,
                          gradient_checkpointing=config.gradient_checkpointing, lora_r=config.lora.r,
                          lora_dropout=config.lora.dropout, attention=config.attention, dtype=dtype, device=device)
    n = max(1, processes)
    weights, grads, optim = est.weights, est.gradients, est.optimizer_states
    if engine == "DDP":
        grads = 2 * grads
    elif engine in ("FSDP", "ZeRO-3"):
        layers = resolve_shape(config.model).num_layers
        weights = weights // n + 2 * weights // max(1, layers)
        grads, optim = grads // n, optim // n
    elif engine == "ZeRO-2":
        grads, optim = grads // n, optim // n
    return DistributedPlan(engine, config.method, machines, processes, config.batch_size,
                           config.gradient_accumulation_steps, config.data.max_length, weights, grads, optim,
                           est.activations + est.logits, est.overhead)
