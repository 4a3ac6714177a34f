"""Model FLOPs per token, the peak FLOP/s they are divided by, and MFU (the parent side of the bench only).

**FLOPs per trained-on token** (every real token, padding never counted), from the model's shape
(``tuneforge.estimate.shapes.ModelShape``: ``L`` layers, query width ``d_attn = H * head_dim``) and ``N_mm``, the
weights that multiply each token (every decoder linear, plus the LM head ``V * d``; the input embedding is a
lookup and norms are not matmuls, so neither counts):

* ``lora`` (the bench's default: LoRA on a frozen base): ``4 * N_mm + 12 * L * d_attn * S``. Forward ``2 N_mm``;
  backward ``2 N_mm``: gradients flow through each frozen linear to its input (``dX = dY W``), but no weight
  gradient (``dW = X^T dY``, the other ``2 N_mm`` of full training) is computed for frozen weights. LoRA's own
  matmuls (``6 r (d_in + d_out)`` per linear) are left out: about 1-2 % at r=16.
* ``6n`` (the full-fine-tuning convention of PaLM's appendix B, Chowdhery et al. 2022, which most MFU figures
  use): ``6 * N_mm + 12 * L * d_attn * S``. For LoRA this counts weight gradients that are never computed, so it
  overstates the work by ``2 N_mm`` per token; it is given for comparison with published MFU figures.

The attention term is PaLM's ``12 * L * H * Q * T`` (``QK^T`` and ``AV``, forward ``4 L d_attn T``, backward
twice that; attention has no weights, so LoRA does its full backward), with ``T`` replaced by ``S``, the span
each token attends over: the token-weighted mean example length ``sum(n_i^2) / sum(n_i)`` of the bench data
(each example capped at max length), because every recipe attends within one example (per-example causal
attention, padding-free packing or one example per padded row). Like PaLM's, it counts the full ``T x T``
score matrix, not only the causal half. Every recipe gets the same FLOPs per real token on the same data, so
MFU ratios equal real-tokens/s ratios.

**Peak FLOP/s**: ``--peak-tflops`` when given; on a GPU the dense BF16 Tensor Core rate of its NVIDIA datasheet
(``tuneforge.estimate.flops.GPU_PEAK_BF16_DENSE_TFLOPS``: the datasheets print the rate with 2:4 sparsity,
marked ``*``, and say the dense rate is half of it); else (a CPU, or a GPU not in the table) the best rate of a
large matmul measured on the machine (``measure.matmul_peak_gflops``).

``MFU = real tokens/s * FLOPs per token / peak FLOP/s``.
"""

from __future__ import annotations

# one copy of the formulas and the peak table: the product's (tuneforge estimate --time)
from tuneforge.estimate.flops import (  # noqa: F401  (re-exported for the bench)
    GPU_PEAK_BF16_DENSE_TFLOPS,
    attention_span,
    datasheet_peak,
    matmul_params,
)
from tuneforge.estimate.flops import flops_per_token as _flops_per_token

FORMULAS = {
    "lora": "4*N_mm + 12*L*d_attn*S (LoRA: forward 2N, backward to the frozen weights' inputs 2N, no weight grads)",
    "6n": "6*N_mm + 12*L*d_attn*S (PaLM's full fine-tuning convention)",
}


def choose_peak(device: str, gpu_name: str | None, peak_tflops: float | None,
                measured_gflops: float) -> tuple[float, str]:
    """``(peak GFLOP/s, what it is)``: the flag, else the datasheet (GPU), else the measured matmul rate."""
    if peak_tflops is not None:
        return peak_tflops * 1e3, f"--peak-tflops {peak_tflops:g}"
    if device.startswith("cuda") and gpu_name:
        known = datasheet_peak(gpu_name)
        if known:
            return known[0] * 1e3, f"{known[1]} -> {known[0]:g} dense"
    kind = "bf16" if device.startswith("cuda") else "fp32"
    return measured_gflops, f"best {kind} matmul measured on this machine ({measured_gflops:.1f} GFLOP/s)"


def flops_per_token(shape, span: float, convention: str = "lora") -> float:
    """Training FLOPs per real token under ``convention``: ``lora``, the frozen base's ``4 N_mm`` (LoRA's own
    matmuls left out), or ``6n``, every matmul weight's gradient too (``tuneforge.estimate.flops``)."""
    trained = {"lora": 0, "6n": matmul_params(shape)}[convention]
    return _flops_per_token(shape, span, trained_matmul=trained).total


def mfu(real_tok_s: float, fpt: float, peak_gflops: float) -> float:
    return real_tok_s * fpt / (peak_gflops * 1e9)
