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
is the methods' one table (each record's ``engines``, :mod:`tuneforge.methods.engines`; each engine tested: 2
processes with gloo equal 1 process). Other plans are printed so that users can size machines, with the one line
``tuneforge train`` refuses them with (:attr:`DistributedPlan.refusal`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from tuneforge.config import RunConfig
from tuneforge.errors import ConfigError
from tuneforge.estimate.memory import GIB, estimable_methods, estimate_memory
from tuneforge.estimate.plan import method_sections
from tuneforge.estimate.shapes import resolve_shape
from tuneforge.methods.engines import engine_refusal
from tuneforge.methods.registry import get_method

# the engine (tuneforge.methods.engines, training/strategies/) that runs each kind of launch
ENGINES = {"single": "single", "DDP": "ddp", "FSDP": "fsdp2", "ZeRO-2": "deepspeed", "ZeRO-3": "deepspeed"}


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
    def refusal(self) -> str | None:
        """The one line ``tuneforge train`` refuses this launch with (None: it trains it), from the method's record."""
        if self.engine not in ENGINES:
            return (f"{self.engine} is not tested with tuneforge train (it runs one process, DDP, FSDP2 and DeepSpeed "
                    "ZeRO-2/3)")
        return engine_refusal(self.method, ENGINES[self.engine])

    @property
    def supported(self) -> bool:
        return self.refusal is None

    def table(self) -> str:
        rows = [
            ("engine", self.engine + ("" if self.supported else f"  (plan only: tuneforge train refuses it: "
                                                                f"{self.refusal})")),
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


ENGINE_PRECISION = {"bf16": "bf16-mixed", "fp16": "fp16-mixed"}


def launch_precision(config: RunConfig, tree: dict, engine: str, device: str) -> str:
    """The precision mode a launch trains in: FSDP and DeepSpeed apply the accelerate config's ``mixed_precision``
    themselves (fp32 master weights under bf16/fp16), one process and DDP tuneforge's ``precision:`` (as
    ``training/precision.py`` resolves it on ``device``)."""
    if engine not in ("single", "DDP"):
        return ENGINE_PRECISION.get(str(tree.get("mixed_precision", "no")), "fp32")
    from tuneforge.estimate.precision import mode_for

    return mode_for(None if config.dtype == "auto" else config.dtype, config.precision, device=device)


def plan_distributed(config: RunConfig, tree: dict, dtype: str | None = None, device: str = "cuda") -> DistributedPlan:
    """Per-device memory and batch of ``config`` launched with the accelerate config ``tree``, in the precision
    mode the launch trains in (:func:`launch_precision`; ``dtype``: the base weights', default the mode's)."""
    if get_method(config.method).memory is None:
        raise ConfigError(f"method {config.method!r}: the memory estimator models {', '.join(estimable_methods())} "
                          "only (a method declares its terms in its record's `memory`)")
    engine = engine_of(tree)
    processes = int(tree.get("num_processes", 1))
    machines = int(tree.get("num_machines", 1))
    shape = resolve_shape(config.model, trust_remote_code=config.trust_remote_code)
    est = estimate_memory(shape, config.method, config.data.max_length, config.batch_size,
                          gradient_checkpointing=config.gradient_checkpointing, attention=config.attention,
                          dtype=dtype, device=device, settings=method_sections(config),
                          precision=launch_precision(config, tree, engine, device))
    n = max(1, processes)
    weights, grads, optim = est.weights, est.gradients, est.optimizer_states
    if engine == "DDP":
        grads = 2 * grads
    elif engine in ("FSDP", "ZeRO-3"):
        layers = shape.num_layers
        weights = weights // n + 2 * weights // max(1, layers)
        grads, optim = grads // n, optim // n
    elif engine == "ZeRO-2":
        grads, optim = grads // n, optim // n
    return DistributedPlan(engine, config.method, machines, processes, config.batch_size,
                           config.gradient_accumulation_steps, config.data.max_length, weights, grads, optim,
                           est.activations + est.logits, est.overhead)
