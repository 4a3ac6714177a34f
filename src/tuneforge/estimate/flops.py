"""Training FLOPs per token from a model's shape and a method, and the GPUs' peak FLOP/s they are divided by.

**FLOPs per trained-on token** (every real token of a packed row; padding-free rows have none), from the model's
shape (:class:`~tuneforge.estimate.shapes.ModelShape`: ``L`` layers, query width ``d_attn = H * head_dim``) and
``N_mm``, the weights that multiply each token (every decoder linear, plus the LM head ``V * d``; the input
embedding is a lookup and norms are not matmuls, so neither counts; an MoE layer counts the ``k`` experts a token
goes through)::

    FLOPs/token = 2 N_mm              forward
                + 2 N_mm              backward to each linear's input (dX = dY W), frozen or not
                + 2 N_trained         weight gradients (dW = X^T dY) of the base weights that train
                + 6 P_added           the method's own weights that multiply every token (LoRA's A and B):
                                      forward, input gradient and weight gradient, 2 each
                + 12 L d_attn S       attention (QK^T and AV: forward 4 L d_attn S, backward twice that)
                [+ 2 N_mm + 4 L d_attn S]   with gradient checkpointing: the forward once more

* full fine-tuning (the method's record says ``is_full_model``): ``N_trained = N_mm``, ``P_added = 0``: PaLM's
  ``6 N`` (appendix B, Chowdhery et al. 2022), which most published MFU figures use.
* LoRA and every other method that adds weights to a frozen base: ``N_trained = 0``, ``P_added`` = its trained
  parameters (LoRA r=16 all-linear on SmolLM2-135M: 4.9M, 3.6% of ``N_mm``; a prompt's or prefix's trained
  parameters do not multiply every token, so ``6 P_added`` overstates them by that little). Without ``6 P_added``
  this is the ``4 N_mm`` convention of ``benchmarks/throughput/flops.py``.

``S`` is the span each token attends over: the token-weighted mean example length ``sum(n_i^2) / sum(n_i)``,
because attention never crosses examples in a packed row (PaLM's ``T`` with the full ``T x T`` score matrix, not
only the causal half). Recompute under gradient checkpointing is counted: it is work the hardware does, and with
it the MFU measured without checkpointing predicts the checkpointed run (H200, 1B shape: 40,039 tok/s without,
so 26,700 predicted with; 27,726 measured; ``benchmarks/results/gpu_profile_2026-12-04.txt``).

**Peak FLOP/s** (:data:`GPU_PEAK_BF16_DENSE_TFLOPS`): the dense BF16 Tensor Core rate of each NVIDIA datasheet
(the datasheets print the rate with 2:4 sparsity and say the dense rate is half of it).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tuneforge.estimate.shapes import ModelShape

# Dense BF16 Tensor Core TFLOP/s (datasheet figure with sparsity / 2). ``--gpu`` names them by the first column in
# lower case with "-" for spaces; a CUDA device name matches by substring in this order (variants first).
GPU_PEAK_BF16_DENSE_TFLOPS: list[tuple[str, float, str]] = [
    ("H200 NVL", 835.5, "NVIDIA H200 datasheet: H200 NVL BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    ("H200", 989.5, "NVIDIA H200 datasheet: H200 SXM BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    ("H100 NVL", 835.5, "NVIDIA H100 datasheet: H100 NVL BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    ("H100 PCIe", 756.5, "NVIDIA H100 datasheet: H100 PCIe BF16 Tensor Core 1,513 TFLOPS with sparsity"),
    ("H100", 989.5, "NVIDIA H100 datasheet: H100 SXM BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    ("A100", 312.0, "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)"),
    ("L40S", 362.05, "NVIDIA L40S datasheet: BF16 Tensor Core 362.05 TFLOPS (733 with sparsity)"),
    ("L4", 121.0, "NVIDIA L4 datasheet: BF16 Tensor Core 242 TFLOPS with sparsity"),
    ("A10", 125.0, "NVIDIA A10 datasheet: BF16 Tensor Core 125 TFLOPS (250 with sparsity)"),
]


def gpu_key(name: str) -> str:
    """``"H100 PCIe"`` -> ``"h100-pcie"``: how ``--gpu`` names a row of the table."""
    return name.lower().replace(" ", "-")


def gpu_peak(gpu: str) -> tuple[str, float, str]:
    """``(name, dense bf16 TFLOP/s, source)`` of the GPU ``--gpu`` names (``h100``, ``h100-pcie``, ``a100``, ...);
    ``ValueError`` naming the closest known one otherwise."""
    for name, tflops, source in GPU_PEAK_BF16_DENSE_TFLOPS:
        if gpu_key(name) == gpu_key(gpu.strip()):
            return name, tflops, source
    known = [gpu_key(n) for n, _, _ in GPU_PEAK_BF16_DENSE_TFLOPS]
    close = difflib.get_close_matches(gpu_key(gpu), known, n=1, cutoff=0.3)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(f"--gpu {gpu!r}: not in the peak table{hint}; known: {', '.join(known)} (or give --peak-tflops)")


def datasheet_peak(device_name: str) -> tuple[float, str] | None:
    """``(dense bf16 TFLOP/s, source)`` of a GPU by its CUDA device name (first substring match), or None."""
    for key, tflops, source in GPU_PEAK_BF16_DENSE_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops, source
    return None


def matmul_params(shape: ModelShape) -> int:
    """``N_mm``: the weights each token is multiplied by (decoder linears, LM head; MoE: the active experts)."""
    per_layer = [sum(d_in * d_out for _, d_in, d_out in layer) for layer in shape.layer_linears()]
    experts = shape.moe_layers * shape.experts_per_tok * 3 * shape.hidden_size * shape.moe_intermediate_size
    return sum(per_layer) + experts + shape.vocab_size * shape.hidden_size


def attention_span(lengths: list[int], max_length: int | None = None) -> float:
    """``S = sum(n_i^2) / sum(n_i)`` over examples (capped at ``max_length`` when given): the mean span a token
    attends over, in tokens; 0 for no examples."""
    capped = [min(n, max_length) if max_length else n for n in lengths if n > 0]
    return sum(n * n for n in capped) / sum(capped) if capped else 0.0


@dataclass(frozen=True)
class FlopsPerToken:
    """The parts of :func:`flops_per_token` (FLOPs per trained-on token; see the module docstring)."""

    forward: float              # 2 N_mm
    input_grads: float          # 2 N_mm
    weight_grads: float         # 2 N_trained
    added: float                # 6 P_added
    attention: float            # 12 L d_attn S
    recompute: float = 0.0      # gradient checkpointing: 2 N_mm + 4 L d_attn S

    @property
    def total(self) -> float:
        return self.forward + self.input_grads + self.weight_grads + self.added + self.attention + self.recompute

    def formula(self) -> str:
        parts = ["4 N_mm"] + (["2 N_mm (weight grads)"] if self.weight_grads else []) + (
            ["6 P_added"] if self.added else []) + ["12 L d_attn S"] + (
            ["recompute 2 N_mm + 4 L d_attn S"] if self.recompute else [])
        return " + ".join(parts)


def flops_per_token(shape: ModelShape, span: float, trained_matmul: int = 0, added_params: int = 0,
                    gradient_checkpointing: bool = False) -> FlopsPerToken:
    """Training FLOPs per token: ``trained_matmul`` base weights with weight gradients (``N_trained``),
    ``added_params`` method weights that multiply every token (``P_added``), ``span`` tokens of attention (``S``)."""
    n_mm = matmul_params(shape)
    attention_forward = 4 * shape.num_layers * shape.q_width * span
    return FlopsPerToken(forward=2 * n_mm, input_grads=2 * n_mm, weight_grads=2 * trained_matmul,
                         added=6 * added_params, attention=3 * attention_forward,
                         recompute=(2 * n_mm + attention_forward) if gradient_checkpointing else 0.0)


def method_flops(shape: ModelShape, method: str, span: float, settings: Mapping[str, Any] | None = None,
                 gradient_checkpointing: bool = False) -> FlopsPerToken:
    """:func:`flops_per_token` for ``method`` as its record describes it: a full model trains every matmul weight;
    any other method adds its trained parameters (its ``memory`` hook's count) to a frozen base."""
    from tuneforge.estimate.memory import estimate_memory
    from tuneforge.methods.registry import get_method

    if get_method(method).is_full_model:
        return flops_per_token(shape, span, trained_matmul=matmul_params(shape),
                               gradient_checkpointing=gradient_checkpointing)
    trainable = estimate_memory(shape, method, max(1, round(span)), 1, settings=settings, device="cpu").trainable_params
    return flops_per_token(shape, span, added_params=trainable, gradient_checkpointing=gradient_checkpointing)
