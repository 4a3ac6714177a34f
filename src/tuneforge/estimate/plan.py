"""Fit a run to a memory budget: choose micro-batch size, gradient accumulation, activation checkpointing and,
when nothing else fits, QLoRA over LoRA, from :func:`tuneforge.estimate.memory.estimate_memory`.

The effective batch (``batch_size x gradient_accumulation_steps`` examples per optimizer step) never changes,
so the training is the same; only how it is split and what is recomputed does. Choices are tried from the
fastest to the leanest: the config's own method without checkpointing at the largest micro-batch that
fits, then with checkpointing, then the method its record names ``leaner`` (``lora``: ``qlora``). Each
candidate is estimated for the worst row: every example ``data.max_length`` tokens long, every token trained
(a plan that fits the worst row fits every row). A candidate fits when its predicted peak is at most
``(1 - margin)`` of the budget: the estimator is within about 8% of measured peaks
(``benchmarks/memory_validation.py``), mostly under them, so the default margin is 10%.

A process's peak is also bounded below by loading (the method's ``load_peak`` term): on CPU, QLoRA quantizes
while reading the full-precision checkpoint, whose pages stay resident until quantizing ends, so its load
peak is about the checkpoint's size plus the quantized weights (``4 * total_params + weights`` from an fp32
checkpoint). On CPU for SmolLM2-135M that is 674 MiB against 684 MiB measured, above the step's own peak at
small batches (477 MiB predicted at 256 x 2 with checkpointing), so a candidate's peak is the larger of the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge.config import RunConfig
from tuneforge.estimate.memory import MemoryEstimate, estimable_methods, estimate_memory
from tuneforge.estimate.shapes import resolve_shape
from tuneforge.methods.registry import get_method, settings_sections

UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
         "g": 2**30, "gb": 2**30, "gib": 2**30}


def parse_memory(text: str) -> int:
    """``"8GB"``, ``"7.5 GiB"``, ``"512MiB"`` -> bytes (binary units: 1 GB = 2**30 bytes, as GPUs report)."""
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("kmgib")
    unit = value[len(number):]
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if amount < 0 or unit not in UNITS:
        raise ValueError(f"memory {text!r}: write a number and a unit, e.g. 8GB or 512MiB")
    return int(amount * UNITS[unit])


@dataclass
class Candidate:
    method: str
    batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    estimate: MemoryEstimate
    device: str = "cpu"

    @property
    def load_peak(self) -> int:
        """Peak while loading the base (the method's term): on CPU, QLoRA holds the fp32 checkpoint's pages while
        quantizing (on a GPU the checkpoint is read in host memory and only the quantized layers land on the
        device); otherwise the weights."""
        return self.estimate.load_peak

    @property
    def peak(self) -> int:
        return max(self.estimate.peak, self.load_peak)


DEFAULT_MARGIN = 0.10


@dataclass
class Plan:
    budget: int
    chosen: Candidate | None
    tried: list[Candidate] = field(default_factory=list)
    margin: float = DEFAULT_MARGIN
    precision: str = ""         # the precision: mode the candidates are estimated in, and why

    @property
    def usable(self) -> int:
        """The most a chosen candidate's predicted peak may be: the budget less the estimator's margin."""
        return int(self.budget * (1 - self.margin))

    def overrides(self) -> list[str]:
        """``--set`` strings that apply the plan to the config."""
        if self.chosen is None:
            return []
        c = self.chosen
        return [f"method={c.method}", f"batch_size={c.batch_size}",
                f"gradient_accumulation_steps={c.gradient_accumulation_steps}",
                f"gradient_checkpointing={str(c.gradient_checkpointing).lower()}"]

    def table(self) -> str:
        lines = [f"memory budget {self.budget / 2**30:.2f} GiB, of which {self.usable / 2**30:.2f} GiB may be "
                 f"predicted ({self.margin:.0%} kept for the estimator's error); candidates, fastest first:"]
        if self.precision:
            lines.insert(0, f"precision {self.precision}")
        lines += [
                 "| method | micro-batch | accumulation | checkpointing | predicted peak GiB | fits |",
                 "|---|---|---|---|---|---|"]
        for c in self.tried:
            mark = "chosen" if c is self.chosen else ("yes" if c.peak <= self.usable else "no")
            lines.append(f"| {c.method} | {c.batch_size} | {c.gradient_accumulation_steps} | "
                         f"{'yes' if c.gradient_checkpointing else 'no'} | {c.peak / 2**30:.2f} | {mark} |")
        if self.chosen is None:
            lines.append("nothing fits: shorten data.max_length, lower lora.r, or use a smaller model")
        else:
            lines.append("apply with: " + " ".join(f"--set {o}" for o in self.overrides()))
        return "\n".join(lines)


def plan_memory(config: RunConfig, budget: int, device: str = "cpu", dtype: str | None = "fp32",
                margin: float = DEFAULT_MARGIN, precision: str | None = None, why: str = "") -> Plan:
    """The fastest way to train ``config`` within ``budget`` bytes of peak memory (see the module docstring);
    ``precision``: the run's mode (its dtypes replace ``dtype``; ``why``: how it was chosen, for the table)."""
    record = get_method(config.method)
    if record.memory is None:
        raise ValueError(f"method {config.method!r}: the memory estimator models {', '.join(estimable_methods())} "
                         "only (a method declares its terms in its record's `memory`)")
    effective = config.batch_size * config.gradient_accumulation_steps
    splits = [(b, effective // b) for b in range(effective, 0, -1) if effective % b == 0]
    methods = [config.method] + ([record.leaner] if record.leaner else [])
    checkpointing = [False, True] if not config.gradient_checkpointing else [True]
    if precision is not None:
        dtype = None
    plan = Plan(budget, None, margin=margin)
    shape = resolve_shape(config.model, trust_remote_code=config.trust_remote_code)
    for method in methods:
        for ckpt in checkpointing:
            if not _trains(config, method, ckpt):
                continue
            for batch, accumulation in splits:
                estimate = estimate_memory(shape, method, config.data.max_length, batch,
                                           gradient_checkpointing=ckpt, attention=config.attention,
                                           dtype=dtype, device=device, settings=method_sections(config),
                                           precision=precision)
                if not plan.precision:
                    plan.precision = _describe(estimate, why)
                candidate = Candidate(method, batch, accumulation, ckpt, estimate, device)
                plan.tried.append(candidate)
                if candidate.peak <= plan.usable:
                    plan.chosen = candidate
                    return plan
    return plan


def _describe(estimate: MemoryEstimate, why: str) -> str:
    """``bf16-mixed (weights fp32: the master weights ...; activations bf16 under autocast ...)``."""
    parts = [f"weights {estimate.dtypes['weights']}", f"optimizer {estimate.dtypes['optimizer states']}",
             f"activations {estimate.dtypes['activations']}"]
    return f"{estimate.precision}{' (' + why + ')' if why else ''}: " + "; ".join(parts)


def _trains(config: RunConfig, method: str, gradient_checkpointing: bool) -> bool:
    """Whether the method's own config check (``Method.check_config``) accepts ``config`` with ``method`` and
    ``gradient_checkpointing`` (prefix tuning refuses checkpointing)."""
    check = get_method(method).check_config
    if check is None:
        return True
    try:
        check(config.model_copy(update={"method": method, "gradient_checkpointing": gradient_checkpointing}))
    except ValueError:
        return False
    return True


def method_sections(config: RunConfig) -> dict:
    """The run config's method sections, ``{key: section}``, as :func:`estimate_memory`'s ``settings``."""
    return {key: config.section(key) for key in settings_sections()}


def device_memory(device: str) -> int:
    """What ``auto_fit`` budgets without ``memory_budget``: a GPU's total memory, or on CPU half the physical
    RAM (glibc keeps freed blocks, so a CPU process's RSS runs about twice its live tensors)."""
    import os

    import torch

    if device == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def plan_for_config(config: RunConfig, budget: int | None = None, precision: tuple[str, str] | None = None) -> Plan:
    """:func:`plan_memory` on the device and in the precision ``config`` trains with. ``precision``: ``(mode, why)``
    as training resolved it (:func:`tuneforge.training.precision.resolve_precision`, which refuses an impossible
    combination in one line: ``tuneforge plan`` and ``auto_fit`` pass it); None: the mode
    :func:`~tuneforge.estimate.precision.mode_for` mirrors. ``budget``: default ``config.memory_budget``, else
    :func:`device_memory`."""
    from tuneforge.estimate.precision import mode_for
    from tuneforge.models.dtype import pick_device

    device = pick_device(config.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    if precision is None:
        precision = (mode_for(None if config.dtype == "auto" else config.dtype, config.precision, device=kind),
                     "as configured" if config.precision != "auto" else "auto")
    if budget is None:
        budget = parse_memory(config.memory_budget) if config.memory_budget else device_memory(kind)
    return plan_memory(config, budget, device=kind, precision=precision[0], why=precision[1])
