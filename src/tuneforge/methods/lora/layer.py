"""tuneforge's training forward for vanilla LoRA layers: same training as peft's, fewer passes, less memory.

peft computes, for each target linear ``W0`` on its own, ``W0 x + lora_B(lora_A(dropout(x))) * scaling``.
On a CPU that costs, per projection: a fp32 Bernoulli draw per element of ``x`` (torch's dropout: 3.4 ms
for 750 x 576 on 2 threads), a dropped fp32 copy of ``x`` saved for backward, a skinny rank-``r`` matmul,
and two passes over the ``(tokens, d_out)`` output (``* scaling``, then ``+``). q, k and v read the same
``x``, as do gate and up: three (two) masks, three (two) copies, three (two) skinny matmuls.

:func:`fuse_lora_forward` changes the class of every peft LoRA layer (``lora.Linear`` and the
bitsandbytes 4/8-bit ones) to a subclass whose training forward is:

* **dropout fused into A** (:class:`_LoraAFunction`): ``h = (x * keep) @ A.T / (1 - p)``, the mask from
  16-bit slices of 64-bit random words (:func:`random_words`, seeded from torch's global generator, so
  seeds reproduce runs and activation checkpointing replays the same masks): each element dropped
  independently with probability ``round(p * 65536) / 65536`` (0.0500031 for 0.05), 0.4 ms instead of
  3.4 ms for the input above. The mask is kept as ``uint8`` 0/1 (1 byte an element) and applied by
  multiplication, ~4x faster on CPU than ``where``/``masked_fill`` with a ``bool`` mask. Backward keeps
  ``x`` itself (shared with the base layer) and the mask, and recomputes the dropped input for the
  gradient of ``A``; the ``1 / (1 - p)`` goes on the rank-``r`` side.
* **one mask and one matmul for projections that read the same input** (``lora.shared_dropout_mask``,
  on by default): q/k/v's ``A`` (and gate/up's) are applied as one ``(r_q + r_k + r_v, d)`` matrix to one
  dropped copy of ``x``. Each projection's input is still dropped with probability ``p``, element by
  element; the masks are now the same for the projections of one layer, which is exactly what peft
  does for models with a fused qkv projection (GPT-2, Phi-3, Falcon). Found by name
  (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj`` under one parent) and checked on every
  call: the group is used only when its members are called in order with the very same input tensor,
  otherwise each member computes its own ``A`` (and the group stops trying).
* **B, the scaling and the residual add in one** ``base_out.baddbmm_(h, B.T, alpha=scaling)``, in place: no
  linear (plain, 4-bit or 8-bit) keeps its output for backward.

Everything else (eval mode, merged or disabled adapters, several active adapters, DoRA and other
variants, LoRA bias, extra forward arguments) runs peft's own forward. Weights, state-dict keys,
saving, loading and merging are peft's; the class change is invisible to them.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as peft_lora

_INT16_SPAN = 1 << 16
# Projections that read the same input under one parent module, in the order the model calls them.
SHARED_INPUT_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def random_words(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` uniformly random int64 words. On CPU from numpy's SFC64 generator, seeded by one draw of torch's
    global generator (so ``torch.manual_seed`` reproduces them and activation checkpointing, which restores
    torch's generator, replays them): 0.24 ms for 107k words against ``torch.randint``'s 0.55 ms (its
    mt19937 runs on one thread). Elsewhere ``torch.randint`` (a counter-based generator on CUDA)."""
    if torch.device(device).type == "cpu":
        seed = int(torch.randint(0, 1 << 62, (1,), dtype=torch.int64))
        return torch.from_numpy(np.random.SFC64(seed).random_raw(n).view(np.int64))
    return torch.randint(-(1 << 63), (1 << 63) - 1, (n,), dtype=torch.int64, device=device)


def drop_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu",
              keep: bool = False) -> torch.Tensor:
    """A ``bool`` tensor of ``shape``: each element True (dropped) with probability ``round(p * 65536) / 65536``
    (``keep=True``: its complement, from the same random words)."""
    n = 1
    for s in shape:
        n *= s
    words = random_words((n + 3) // 4, device)
    threshold = round(p * _INT16_SPAN) - (1 << 15)
    words = words.view(torch.int16)[:n].view(shape)
    return words >= threshold if keep else words < threshold


def keep_multiplier(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The complement of :func:`drop_mask` as ``uint8`` 0/1: multiplying a float tensor by it is ~4x faster on
    CPU than ``torch.where`` / ``masked_fill`` with a ``bool`` mask (63 vs 280 us for 743 x 576, 2 threads)."""
    return drop_mask(shape, p, device, keep=True).view(torch.uint8)


class _LoraAFunction(torch.autograd.Function):
    """``h = dropout_p(x) @ cat(A_1, ..., A_n).T``: one mask and one matmul for ``n`` LoRA ``A``'s reading ``x``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, *weights: torch.Tensor) -> torch.Tensor:
        w = weights[0] if len(weights) == 1 else torch.cat(weights)
        keep = keep_multiplier(x.shape, p, x.device) if p > 0 else None
        h = F.linear(x if keep is None else x * keep, w)
        if keep is not None:
            h.mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(x, keep, *weights)      # the parameters, not their (re-made) concatenation
        ctx.p, ctx.ranks = p, [a.shape[0] for a in weights]
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        x, keep, *weights = ctx.saved_tensors
        g = grad_h * (1.0 / (1.0 - ctx.p)) if keep is not None else grad_h
        if g.dtype != x.dtype:      # autocast's forward computed in bf16/fp16: so does backward (autograd casts back)
            x, weights = x.to(g.dtype), [w.to(g.dtype) for w in weights]
        if keep is not None and ctx.needs_input_grad[0] and any(ctx.needs_input_grad[2:]):
            keep = keep.to(x.dtype)     # used twice: convert once (a uint8 operand is converted on every use)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ (weights[0] if len(weights) == 1 else torch.cat(weights))
            if keep is not None:
                grad_x.mul_(keep)
        grad_ws: tuple = (None,) * len(ctx.ranks)
        if any(ctx.needs_input_grad[2:]):
            dropped = x if keep is None else x * keep
            grad_w = g.reshape(-1, g.shape[-1]).t() @ dropped.reshape(-1, dropped.shape[-1])
            grad_ws = grad_w.split(ctx.ranks) if len(ctx.ranks) > 1 else (grad_w,)
        return (grad_x, None, *grad_ws)


def _dropout_p(layer, name: str) -> float:
    drop = layer.lora_dropout[name]
    return float(drop.p) if isinstance(drop, torch.nn.Dropout) else 0.0


def lora_hidden(layers: list, name: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``lora_A(dropout(x))`` of adapter ``name`` for each of ``layers``, with one mask and one matmul."""
    first = layers[0]
    x = first._cast_input_dtype(x, first.lora_A[name].weight.dtype)
    h = _LoraAFunction.apply(x, _dropout_p(first, name), *(layer.lora_A[name].weight for layer in layers))
    if len(layers) == 1:
        return (h,)
    return h.split([layer.lora_A[name].weight.shape[0] for layer in layers], dim=-1)


class SharedInputGroup:
    """LoRA layers of one module that read the same input (q/k/v, gate/up): the first computes all their
    ``A`` outputs, the others pick theirs up if they are called with the very same tensor."""

    def __init__(self, layers: list):
        self.layers = layers
        self.active = True          # False once a call showed that the members do not share their input
        self._x: torch.Tensor | None = None
        self._name: str | None = None
        self._pending: dict = {}

    def hidden(self, layer, name: str, x: torch.Tensor) -> torch.Tensor:
        if layer in self._pending and self._x is x and self._name == name:
            h = self._pending.pop(layer)
            if not self._pending:
                self._x, self._name = None, None
            return h
        if layer is self.layers[0] and self.active and all(
                member._fused_adapter(x, (), {}) == name for member in self.layers):
            hs = lora_hidden(self.layers, name, x)
            self._x, self._name, self._pending = x, name, dict(zip(self.layers[1:], hs[1:], strict=True))
            return hs[0]
        if self._pending:            # a member called with another input, or out of order: stop sharing
            self.active = False
        self._x, self._name, self._pending = None, None, {}
        return lora_hidden([layer], name, x)[0]


if TYPE_CHECKING:      # what the mixin is mixed into: a peft LoRA layer (lora.Linear or a bitsandbytes one)
    _LoraLayer = peft_lora.Linear
else:
    _LoraLayer = object


class FusedLoraForward(_LoraLayer):
    """Mixin over a peft LoRA layer class: the fused training forward (see the module docstring)."""

    _shared_input: SharedInputGroup | None = None

    def _fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The adapter the fused forward would run, or None where peft's own forward must run."""
        if not self.training or args or kwargs or self.disable_adapters or self.merged:
            return None
        if len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
            return None
        if not isinstance(self.lora_dropout[name], (torch.nn.Dropout, torch.nn.Identity)):
            return None
        if x.dtype != self.lora_A[name].weight.dtype and not getattr(self, "cast_input_dtype_enabled", True):
            return None
        return name

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        group = self._shared_input
        h = group.hidden(self, name, x) if group is not None else lora_hidden([self], name, x)[0]
        b, scaling = cast(torch.nn.Linear, self.lora_B[name]).weight, self.scaling[name]
        if result.dtype != h.dtype or b.dtype != h.dtype:       # peft's order of casts
            return (result + F.linear(h, b) * scaling).to(result.dtype)
        if result._is_view():
            # bitsandbytes' 4-bit matmul with a bias (Qwen2's q/k/v, GPT-NeoX) returns F.linear's view of its
            # flattened output, which autograd forbids changing in place inside its custom Function: add apart
            return result + F.linear(h, b) * scaling
        # in place: the base layer's backward does not need its output (plain, 4-bit and 8-bit linears)
        if result.dim() == 3:     # baddbmm: its backward copies less than addmm's on flattened views
            return result.baddbmm_(h, b.t().expand(result.shape[0], -1, -1), alpha=scaling)
        flat = result.reshape(-1, result.shape[-1])
        return flat.addmm_(h.reshape(-1, h.shape[-1]), b.t(), alpha=scaling).view(result.shape)


class FusedLoraLinear(FusedLoraForward, peft_lora.Linear):
    """peft's ``lora.Linear`` with the fused training forward."""


@functools.cache
def fused_classes() -> dict[type, type]:
    """peft LoRA layer class -> its fused subclass (the bitsandbytes ones only where bitsandbytes imports)."""
    classes: dict[type, type] = {peft_lora.Linear: FusedLoraLinear}
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return classes
    if hasattr(peft_bnb, "Linear4bit"):
        class FusedLoraLinear4bit(FusedLoraForward, peft_bnb.Linear4bit):
            """peft's 4-bit (QLoRA) LoRA layer with the fused training forward."""

        classes[peft_bnb.Linear4bit] = FusedLoraLinear4bit
    if hasattr(peft_bnb, "Linear8bitLt"):
        class FusedLoraLinear8bitLt(FusedLoraForward, peft_bnb.Linear8bitLt):
            """peft's 8-bit LoRA layer with the fused training forward."""

        classes[peft_bnb.Linear8bitLt] = FusedLoraLinear8bitLt
    return classes


def fuse_lora_forward(model: torch.nn.Module, shared_dropout_mask: bool = True) -> int:
    """Give every peft LoRA layer of ``model`` the fused training forward; returns how many.

    With ``shared_dropout_mask``, projections that read the same input share one mask and one ``A`` matmul.
    """
    classes = fused_classes()
    fused = 0
    for module in model.modules():
        cls = classes.get(type(module))
        if cls is not None:
            module.__class__ = cls
            fused += 1
    if shared_dropout_mask:
        for parent in model.modules():
            for names in SHARED_INPUT_PROJECTIONS:
                members = [getattr(parent, n, None) for n in names]
                layers = [layer for layer in members if isinstance(layer, FusedLoraForward)]
                if len(layers) > 1 and _same_adapters(layers):
                    group = SharedInputGroup(layers)
                    for layer in layers:
                        layer._shared_input = group
    return fused


def _same_adapters(layers: list) -> bool:
    first = layers[0]
    return all(set(layer.lora_A) == set(first.lora_A)
               and all(_dropout_p(layer, n) == _dropout_p(first, n) for n in first.lora_A) for layer in layers)
