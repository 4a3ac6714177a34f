"""LoRA's part of the memory estimate (the shared arithmetic and its derivation: :mod:`tuneforge.estimate.memory`).

LoRA ``all-linear`` over a frozen base: ``r*(d_in + d_out)`` fp32 parameters per decoder linear (peft keeps
adapters in fp32, ``b = 4`` bytes), trained with fp32 gradients and AdamW states. A block saves, per token, what a
frozen block does (a frozen weight needs no saved input) plus what the seven ``A`` projections save of their
inputs (widths ``5d + q + I`` in all; ``2d + q + I`` over the 4 groups that read one input: q/k/v, o, gate/up,
down) and their rank-``r`` outputs (``7*b*r``):

* tuneforge's fused forward (the default, :mod:`tuneforge.methods.lora.layer`): one uint8 dropout mask per group
  (``2d + q + I``; ``5d + q + I`` without ``shared_dropout_mask``) + the distinct inputs: ``b*(2d + I)`` when
  ``a = b`` (the o input is the block's concatenated attention output, counted once), else one fp32 cast per
  group, ``b*(2d + q + I)`` (``b*(5d + q + I)`` unshared);
* peft's forward with dropout: mask (``m*w``) + dropped copy (``b*w``) per projection, ``(m + b)*(5d + q + I)``
  (``m = b`` on CPU, a float mask; ``m = 1`` on CUDA, a bool mask);
* peft's forward without dropout: ``b*(2d + I)`` when ``a = b``, else ``b*(5d + q + I)``.

Under autocast (``bf16-mixed`` / ``fp16-mixed``; the base in the compute dtype, ``c`` bytes) the fused forward
saves the same, except that the rank-``r`` outputs come out of autocast's matmul in ``c`` (``7*c*r``); each
``B``'s ``c`` copy (autocast's cast of a leaf weight, ``c*r*d_out`` per linear) is saved for ``h``'s gradient.
Checked exactly against ``saved_tensors_hooks`` under ``torch.autocast`` (``tests/test_estimate_precision.py``);
peft's forward under autocast is not checked.

``target_modules`` other than ``all-linear`` and DoRA's extra terms are not modelled (DoRA adds its magnitude
vectors, ``d_out`` per linear, to the trained parameters).
"""

from __future__ import annotations

from typing import Any

from tuneforge.methods.memory import MemoryInputs, MemoryTerms, base_weight_bytes, moe_block

ADAPTER_BYTES = 4      # peft keeps adapters in fp32


def moe_targets(inputs: MemoryInputs) -> list[tuple[str, int, int, int, int]]:
    """What LoRA adapts in each MoE layer besides the attention (router, stacked experts: ``(name, d_in, d_out,
    copies, rank_factor)``, :meth:`~tuneforge.estimate.shapes.ModelShape.moe_lora_targets`), for all MoE layers."""
    shape = inputs.shape
    return shape.moe_lora_targets() * shape.moe_layers if shape.num_experts else []


def lora_parameters(inputs: MemoryInputs, r: int, dora: bool = False) -> int:
    """``r*(d_in + d_out)`` per decoder linear (+ ``d_out`` for DoRA's magnitude), over all layers; in an MoE
    layer the router and every expert's ``gate_up`` (rank ``2r``) and ``down`` too (peft's ``ParamWrapper``:
    ``r*E`` rows per stacked weight; DoRA refuses them)."""
    return (sum(r * (d_in + d_out) + (d_out if dora else 0)
                for layer in inputs.shape.layer_linears() for _, d_in, d_out in layer)
            + sum(f * r * n * (d_in + d_out) for _, d_in, d_out, n, f in moe_targets(inputs)))


def lora_block_bytes(inputs: MemoryInputs, cfg: Any, act_bytes: int) -> int:
    """Bytes a decoder layer with LoRA on its seven linears saves per token (``cfg``: the ``lora`` section)."""
    shape, a, b = inputs.shape, act_bytes, ADAPTER_BYTES
    d, i, q = shape.hidden_size, shape.intermediate_size, shape.q_width
    block = inputs.block(a)
    widths = 5 * d + q + i
    group_widths = 2 * d + q + i if cfg.shared_dropout_mask else widths   # one mask / fp32 copy per group
    if cfg.fused_forward:
        masks = group_widths if cfg.dropout > 0 else 0
        adapters = masks + (b * (2 * d + i) if a == b else b * group_widths)
    elif cfg.dropout > 0:
        m = b if inputs.device == "cpu" else 1
        adapters = (m + b) * widths
    else:
        adapters = b * (2 * d + i) if a == b else b * widths
    saves_o_input = a == b and (cfg.dropout == 0 or cfg.fused_forward)
    ranks = inputs.autocast_bytes or b     # the rank-r outputs: autocast's compute dtype, else the adapters'
    dense = adapters + len(shape.linears()) * ranks * cfg.r + (block.o_input if saves_o_input else 0)
    if not shape.num_experts:
        return block.frozen + dense + (block.o_copy if saves_o_input else 0)
    # an MoE layer: LoRA on the attention's 4 linears (the q/k/v group's input, cast when a != b), the router's
    # input, and what the experts save as trained weights (peft's ParamWrapper computes with W + BA)
    moe = (b * d if a == b else b * (d + q)) + len(shape.attention_linears()) * ranks * cfg.r + a * d + \
        moe_block(shape, a)[1] + (block.o_input if saves_o_input else 0)
    L = shape.num_layers
    return block.frozen + (shape.moe_layers * moe + shape.dense_layers * dense) // L + \
        (block.o_copy if saves_o_input else 0)


def moe_weight_copies(inputs: MemoryInputs, act_bytes: int) -> int:
    """Bytes per layer (averaged over all layers) of the ``W + BA`` weights peft's ParamWrapper builds for every MoE
    layer's router and stacked experts, saved for backward whatever the row's length: ``a*(3E*d*I_moe + d*E)``."""
    shape = inputs.shape
    if not shape.num_experts:
        return 0
    e, d, im = shape.num_experts, shape.hidden_size, shape.moe_intermediate_size
    return act_bytes * (3 * e * d * im + d * e) * shape.moe_layers // shape.num_layers


def lora_terms(inputs: MemoryInputs, cfg: Any, base_weights: int, act_bytes: int, note: str) -> MemoryTerms:
    """LoRA ``cfg`` over a frozen base of ``base_weights`` bytes with activations of ``act_bytes``."""
    trainable = lora_parameters(inputs, cfg.r, cfg.use_dora)
    largest = max([cfg.r * max(d_in, d_out) for _, d_in, d_out in inputs.shape.linears()]
                  + [f * cfg.r * n * max(d_in, d_out) for _, d_in, d_out, n, f in moe_targets(inputs)])
    c = inputs.autocast_bytes
    casts = 0 if c is None else c * (sum(cfg.r * d_out for layer in inputs.shape.layer_linears()
                                         for _, _, d_out in layer)     # each B's copy in the compute dtype
                                     + sum(f * cfg.r * n * d_out for _, _, d_out, n, f in moe_targets(inputs)))
    return MemoryTerms(
        trainable_params=trainable, weights=base_weights + trainable * ADAPTER_BYTES, param_bytes=ADAPTER_BYTES,
        largest_trainable=largest, act_bytes=act_bytes, per_token_layer=lora_block_bytes(inputs, cfg, act_bytes),
        per_layer=moe_weight_copies(inputs, act_bytes),
        weight_casts=casts, autocast_checked=cfg.fused_forward and not cfg.use_dora,
        notes=(note,) + (("DoRA: its magnitude vectors train; its forward's extra activations are not modelled",)
                         if cfg.use_dora else ()))


def lora_memory(inputs: MemoryInputs) -> MemoryTerms:
    cfg = inputs.settings["lora"]
    return lora_terms(inputs, cfg, base_weight_bytes(inputs), inputs.dtype_bytes,
                      f"LoRA r={cfg.r} on all 7 decoder linears (fp32 adapters, dropout {cfg.dropout}) "
                      f"over a frozen {inputs.dtype} base")
