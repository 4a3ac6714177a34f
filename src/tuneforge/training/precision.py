"""Precision modes (``precision:``): which dtype each part of a run is stored and computed in.

``dtype:`` is where the base model's weights are stored; ``precision:`` is how the run computes and what it
updates:

* ``fp32``: everything in fp32 (the default on CPUs).
* ``bf16-mixed`` (the default on GPUs with bf16): forward and backward under ``torch.autocast`` to bf16 (matrix
  products in bf16, reductions, softmax and losses in fp32), trained parameters and the optimizer's states in
  fp32. Full fine-tuning loads the model in fp32: those fp32 weights are the master weights, and autocast makes
  the bf16 copies its matrix products use. Adapter methods keep the frozen base in bf16 (``dtype: auto``).
* ``bf16-true``: weights in bf16 and no autocast (every op in bf16): the least memory. Adapters stay fp32. Full
  fine-tuning keeps no fp32 copy: its AdamW (:class:`~tuneforge.kernels.compensated_adamw.CompensatedAdamW`)
  holds fp32 moments and a bf16 compensation buffer per weight that carries each update's rounding error into
  the next (Kahan summation), so updates below bf16's resolution (2^-8 relative) add up instead of rounding
  away. Why not an fp32 copy: it costs 4 bytes per parameter, making ``bf16-true`` as large as ``bf16-mixed``
  (2 + 4 + 2 + 8 = 16 B) and taking away its reason to exist; the compensation costs 2 (2 + 2 + 2 + 8 = 14 B).
* ``fp16-mixed`` (the default on GPUs without bf16): autocast to fp16 and a gradient scaler (``torch.amp``'s
  ``GradScaler``): the loss is multiplied by the scale before backward, gradients are unscaled before clipping,
  a step whose gradients overflowed is skipped and the scale halved (grown x2 after 2000 clean steps). Skipped
  steps are counted in ``metrics.jsonl`` (``scaler_skipped``, ``loss_scale``); the NaN guard leaves overflowing
  gradients to the scaler and stops only when the loss itself is not finite or the scale falls below 1.

In every mode the trained parameters of adapter methods (LoRA, DoRA, IA3, prefix and prompt tuning, bottleneck
adapters) are fp32, also on a bf16 or 4-bit base. ``auto`` picks by device (and by ``dtype:`` when that is set).
:func:`resolve_precision` decides, before any weights load, and refuses impossible combinations in one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from tuneforge.errors import ConfigError
from tuneforge.models.dtype import cpu_has_native_bf16, pick_dtype

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16-true", "fp16-mixed")
# test-only switch: fp16-mixed on a CPU (torch's CPU autocast and GradScaler support fp16, very slowly), so that the
# scaler's skip / back-off / resume paths run in CI; users get the one-line refusal
FP16_ON_CPU_FOR_TESTS = "TUNEFORGE_TEST_FP16_ON_CPU"

_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class PrecisionPlan:
    """What :func:`resolve_precision` decided for a run.

    ``base_dtype``: the base model's weights as loaded (``dtype:``); ``trained_dtype``: the trained parameters'
    storage (fp32, but a full fine-tune's bf16 weights in ``bf16-true``); ``autocast_dtype``: the dtype
    ``torch.autocast`` computes matrix products in (None: no autocast); ``loss_scaling``: a ``GradScaler``;
    ``compensated``: the Kahan-compensated AdamW updates the (bf16) trained weights."""

    mode: str
    base_dtype: torch.dtype
    trained_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    loss_scaling: bool
    compensated: bool
    reason: str

    def describe(self) -> str:
        """One line for the log: what is computed and stored in which dtype."""
        parts = [f"autocast to {dtype_name(self.autocast_dtype)}" if self.autocast_dtype is not None else
                 f"compute in {dtype_name(self.base_dtype)}"]
        if self.compensated:
            parts.append("trained weights bf16 with Kahan-compensated AdamW updates (fp32 moments)")
        else:
            parts.append(f"trained parameters and optimizer states {dtype_name(self.trained_dtype)}")
        if self.base_dtype != self.trained_dtype:
            parts.append(f"frozen base weights {dtype_name(self.base_dtype)}")
        if self.loss_scaling:
            parts.append("dynamic loss scaling")
        return f"{self.mode} ({'; '.join(parts)}; {self.reason})"

    def record(self) -> dict[str, Any]:
        """What ``run.json`` keeps of it."""
        return {"mode": self.mode, "base_dtype": dtype_name(self.base_dtype),
                "trained_dtype": dtype_name(self.trained_dtype),
                "autocast_dtype": None if self.autocast_dtype is None else dtype_name(self.autocast_dtype),
                "loss_scaling": self.loss_scaling, "compensated_updates": self.compensated, "reason": self.reason}


def _fp16_on_cpu_allowed() -> bool:
    return os.environ.get(FP16_ON_CPU_FOR_TESTS, "").lower() in ("1", "true", "yes")


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True           # CPU autocast computes bf16 everywhere (natively with AVX512-BF16 / AMX, else emulated)


def _auto_mode(dtype: str, device: torch.device) -> tuple[str, str]:
    """``precision: auto``: the mode, and why."""
    if dtype != "auto":
        weights, why = pick_dtype(dtype, device)
        mode = {torch.float32: "fp32", torch.bfloat16: "bf16-true", torch.float16: "fp16-mixed"}[weights]
        return mode, f"auto: dtype {dtype} ({why})"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "auto: this GPU has bf16"
        return "fp16-mixed", "auto: this GPU lacks bf16"
    return "fp32", f"auto: fp32 on {device.type}"


def resolve_precision(precision: str, dtype: str, device: torch.device, full: bool) -> PrecisionPlan:
    """The precision plan of a run on ``device``; ``full``: the method trains the base weights themselves. Raises
    :class:`~tuneforge.errors.ConfigError` (one line naming the key and what to use instead) for a combination
    that cannot train right: ``fp16-mixed`` off a GPU, ``bf16-*`` on a GPU without bf16, a full fine-tune whose
    weights ``dtype:`` would store below the mode's master weights, a ``dtype:`` the mode does not compute in."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    reason = "as configured"
    mode = precision
    if precision == "auto":
        mode, reason = _auto_mode(dtype, device)
    if mode == "fp16-mixed" and device.type != "cuda" and not _fp16_on_cpu_allowed():
        raise ConfigError(f"precision: fp16-mixed needs a CUDA GPU (this run is on {device.type}): use precision: "
                          "fp32 on CPUs (or bf16-mixed where the CPU has native bf16)")
    if mode.startswith("bf16") and not _bf16_supported(device):
        raise ConfigError(f"precision: {mode} on a GPU without bf16 ({torch.cuda.get_device_name(device)}): use "
                          "precision: fp16-mixed (or auto, which picks it on such GPUs)")
    if mode.startswith("bf16") and device.type == "cpu" and not cpu_has_native_bf16() and precision != "auto":
        log.warning("precision %s on a CPU without native bf16: bf16 matrix products are emulated (about 150x "
                    "slower than fp32 here); precision: fp32 is faster on this machine", mode)
    lowered = {"fp32": torch.float32, "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16,
               "fp16-mixed": torch.float16}[mode]
    # the base model's storage: the mode's compute dtype for a frozen base; fp32 master weights for a full fine-tune
    # in a mixed mode; a dtype: the user set must be the one the mode stores
    expected = torch.float32 if full and mode.endswith("-mixed") else lowered
    if dtype != "auto" and precision != "auto":
        asked, _ = pick_dtype(dtype, device) if device.type != "cpu" else (_dtype_of(dtype), "")
        if asked != expected:
            if full and mode.endswith("-mixed"):
                why = (f"full fine-tuning under {mode} updates fp32 master weights, so the model loads in fp32: "
                       "remove dtype (or set dtype: auto)"
                       + (", or use precision: bf16-true to keep bf16 weights" if mode == "bf16-mixed" else ""))
            else:
                why = f"{mode} stores the base weights in {dtype_name(expected)}: remove dtype (or set dtype: auto)"
            raise ConfigError(f"dtype: {dtype} with precision: {mode}: {why}")
    compensated = full and mode == "bf16-true"
    return PrecisionPlan(mode=mode, base_dtype=expected, trained_dtype=torch.bfloat16 if compensated else torch.float32,
                         autocast_dtype=lowered if mode.endswith("-mixed") else None,
                         loss_scaling=mode == "fp16-mixed", compensated=compensated, reason=reason)


def _dtype_of(name: str) -> torch.dtype:
    from tuneforge.models.dtype import DTYPES

    return DTYPES[name]


class Precision:
    """The run-time side of a :class:`PrecisionPlan`: the autocast context of every forward, the scaled backward
    and the scaler's part of the optimizer step. Strategies call :meth:`autocast`, :meth:`backward`,
    :meth:`unscale` and :meth:`step`; with ``fp32`` each is the plain torch call."""

    def __init__(self, plan: PrecisionPlan, device: torch.device) -> None:
        self.plan = plan
        self.device_type = device.type
        self.scaler: torch.amp.GradScaler | None = (torch.amp.GradScaler(device.type) if plan.loss_scaling
                                                     else None)
        self.last_skipped = False

    @classmethod
    def fp32(cls, device: torch.device | None = None) -> Precision:
        """Plain fp32 (what a run without a plan computes in)."""
        plan = PrecisionPlan("fp32", torch.float32, torch.float32, None, False, False, "default")
        return cls(plan, device or torch.device("cpu"))

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context every forward of the run (training, validation, reference log-probs) runs in."""
        if self.plan.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.plan.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Before clipping: the true gradients (fp16-mixed divides the scale back out)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step; under loss scaling the scaler's (skipped when the gradients overflowed; the scale
        then backs off) and its update. :attr:`last_skipped` says whether it skipped."""
        if self.scaler is None:
            optimizer.step()
            self.last_skipped = False
            return
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        self.last_skipped = self.scaler.get_scale() < before

    def skip(self) -> None:
        """A step the loop does not take (a non-finite loss): the scaler still forgets its unscaled state."""
        if self.scaler is not None:
            self.scaler.update()

    @property
    def loss_scale(self) -> float | None:
        return None if self.scaler is None else float(self.scaler.get_scale())

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def cast_trained(model: torch.nn.Module, plan: PrecisionPlan) -> int:
    """Store every trained parameter in ``plan.trained_dtype`` (adapters in fp32 on a bf16/fp16/4-bit base);
    returns how many were cast."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != plan.trained_dtype:
            p.data = p.data.to(plan.trained_dtype)
            cast += 1
    return cast
