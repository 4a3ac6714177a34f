"""Liger-Kernel's Triton kernels (CUDA) in place of tuneforge's CPU fusions, applied to one model instance.

Liger's ``apply_liger_kernel_to_*`` replaces transformers' classes module-wide (every model built afterwards in the
process gets them) and the causal-LM forward (its own loss, which would bypass tuneforge's packed loss). Here
only the modules of the given instance change, as tuneforge's own fusions do:

- the RMSNorms whose formula :mod:`tuneforge.kernels.rms_norm` knows get Liger's RMSNorm forward (``llama``
  casting for Llama/Mistral/Qwen, ``gemma`` casting with ``offset=1`` for Gemma 1/2/3), out of place;
- the gated MLPs get Liger's SwiGLU (``silu``) or GeGLU (``gelu_pytorch_tanh``) forward, which calls the
  module's own ``gate_proj``/``up_proj``/``down_proj`` (so LoRA layers on them still run);
- the LM head is marked: :func:`tuneforge.kernels.chunked_loss.chunked_cross_entropy_sum` then computes the summed
  loss with Liger's fused linear cross-entropy (``reduction="sum"``: tuneforge's objectives need sums over the
  trained tokens, not means). Per-example sums (preference objectives) keep tuneforge's chunked loss.

liger-kernel is imported when a model is patched, never at import time.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any

import torch

from tuneforge.kernels.rms_norm import GEMMA_RMS_NORM_CLASSES, PLAIN_RMS_NORM_CLASSES

SWIGLU_MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
GEGLU_MLP_CLASSES = frozenset({"GemmaMLP", "Gemma2MLP", "Gemma3MLP"})
LOSS_ATTRIBUTE = "tuneforge_fused_loss"      # set on the LM head module: which fused loss computes its sums


def patch_rms_norms(model: torch.nn.Module) -> int:
    """Give the known RMSNorms of ``model`` Liger's forward; return how many."""
    from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module

    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if name in PLAIN_RMS_NORM_CLASSES:
            _patch_rms_norm_module(module, offset=0.0, casting_mode="llama", in_place=False)
        elif name in GEMMA_RMS_NORM_CLASSES:
            _patch_rms_norm_module(module, offset=1.0, casting_mode="gemma", in_place=False)
        else:
            continue
        changed += 1
    return changed


def _activation(module: torch.nn.Module) -> str | None:
    config = getattr(module, "config", None)
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)


def patch_mlps(model: torch.nn.Module) -> int:
    """Give the gated MLPs of ``model`` Liger's SwiGLU / GeGLU forward; return how many."""
    from liger_kernel.transformers.geglu import LigerGEGLUMLP
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if not all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            continue
        if name in SWIGLU_MLP_CLASSES and _activation(module) in ("silu", "swish"):
            forward = LigerSwiGLUMLP.forward
        elif name in GEGLU_MLP_CLASSES and _activation(module) == "gelu_pytorch_tanh":
            forward = LigerGEGLUMLP.forward
        else:
            continue
        module.forward = types.MethodType(forward, module)
        changed += 1
    return changed


def mark_fused_loss(head: torch.nn.Module) -> None:
    setattr(head, LOSS_ATTRIBUTE, "liger")


def uses_liger_loss(head: torch.nn.Module) -> bool:
    return getattr(head, LOSS_ATTRIBUTE, None) == "liger"


@functools.cache
def _loss_module() -> Any:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    kwargs: dict[str, Any] = {"reduction": "sum"}
    if "accum_dtype" in inspect.signature(LigerFusedLinearCrossEntropyLoss.__init__).parameters:
        kwargs["accum_dtype"] = torch.float32     # the head's gradient summed in fp32, as tuneforge's chunked loss
    return LigerFusedLinearCrossEntropyLoss(**kwargs)


def liger_cross_entropy_sum(hidden: torch.Tensor, lm_head: torch.nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of ``lm_head(hidden [K, d])`` against ``targets [K]`` by Liger's fused kernel (fp32)."""
    return _loss_module()(lm_head.weight, hidden, targets, lm_head.bias).float()
