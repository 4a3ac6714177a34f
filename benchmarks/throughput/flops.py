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
(:data:`GPU_PEAK_BF16_DENSE_TFLOPS`: the datasheets print the rate with 2:4 sparsity, marked ``*``, and say the
dense rate is half of it); else (a CPU, or a GPU not in the table) the best rate of a large matmul measured on
the machine (``measure.matmul_peak_gflops``).

``MFU = real tokens/s * FLOPs per token / peak FLOP/s``.
"""

from __future__ import annotations

# Dense BF16 Tensor Core TFLOP/s (datasheet figure with sparsity / 2), matched against torch.cuda.get_device_name()
# in this order (first substring match wins, so the variants come before the plain names).
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

FORMULAS = {
    "lora": "4*N_mm + 12*L*d_attn*S (LoRA: forward 2N, backward to the frozen weights' inputs 2N, no weight grads)",
    "6n": "6*N_mm + 12*L*d_attn*S (PaLM's full fine-tuning convention)",
}


def datasheet_peak(gpu_name: str) -> tuple[float, str] | None:
    """``(dense bf16 TFLOP/s, source)`` of a GPU by its CUDA device name, or None when the table lacks it."""
    for key, tflops, source in GPU_PEAK_BF16_DENSE_TFLOPS:
        if key.lower() in gpu_name.lower():
            return tflops, source
    return None


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


def matmul_params(shape) -> int:
    """``N_mm``: the weights each token is multiplied by (decoder linears, LM head); see the module docstring.

    An MoE layer counts its attention plus ``experts_per_tok`` experts (the ones a token goes through)."""
    per_layer = [sum(d_in * d_out for _, d_in, d_out in layer) for layer in shape.layer_linears()]
    experts = shape.moe_layers * shape.experts_per_tok * 3 * shape.hidden_size * shape.moe_intermediate_size
    return sum(per_layer) + experts + shape.vocab_size * shape.hidden_size


def attention_span(lengths: list[int], max_length: int) -> float:
    """``S = sum(n_i^2) / sum(n_i)`` over examples capped at ``max_length``: the mean span a token attends over."""
    capped = [min(n, max_length) for n in lengths if n > 0]
    return sum(n * n for n in capped) / sum(capped) if capped else 0.0


def flops_per_token(shape, span: float, convention: str = "lora") -> float:
    """Training FLOPs per real token under ``convention`` (``lora`` or ``6n``)."""
    weights = {"lora": 4, "6n": 6}[convention] * matmul_params(shape)
    return weights + 12 * shape.num_layers * shape.q_width * span


def mfu(real_tok_s: float, fpt: float, peak_gflops: float) -> float:
    return real_tok_s * fpt / (peak_gflops * 1e9)
