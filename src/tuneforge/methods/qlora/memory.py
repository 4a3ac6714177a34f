"""QLoRA's part of the memory estimate: LoRA's terms (:mod:`tuneforge.methods.lora.memory`) over a 4-bit base.

Each decoder linear is stored in NF4 (0.5 B/param) plus one absmax per block of 64 (4 B, or with double quant
1 B + 4 B per 256 blocks, and a 256-entry fp32 code table per linear); embeddings, norms and an untied
``lm_head`` stay unquantized and peft's ``prepare_model_for_kbit_training`` upcasts them to fp32. The fp32
embeddings make the residual stream fp32 (``a = 4``) and bitsandbytes' 4-bit matmul saves no input.

Loading on CPU quantizes while reading the full-precision checkpoint, whose pages stay resident until quantizing
ends: the load peaks at about the checkpoint's size plus the quantized weights (``4 * P + weights`` from an fp32
checkpoint; on a GPU only the quantized layers land on the device). ``qlora.bits: 8`` is not modelled (the
estimate is for 4 bits).
"""

from __future__ import annotations

import math
from dataclasses import replace

from tuneforge.methods.lora.memory import lora_terms
from tuneforge.methods.memory import MemoryInputs, MemoryTerms

NF4_BLOCK = 64


def quantized_weight_bytes(inputs: MemoryInputs, double_quant: bool) -> int:
    """The base as QLoRA stores it: NF4 linears with their block statistics, the rest in fp32."""
    shape = inputs.shape
    layers = shape.num_layers
    linear = shape.quantizable_params()
    blocks = math.ceil(linear / NF4_BLOCK)
    if double_quant:
        stats = blocks * 1 + math.ceil(blocks / 256) * 4 + layers * len(shape.linears()) * 256 * 4
    else:
        stats = blocks * 4
    return linear // 2 + stats + (shape.num_parameters() - linear) * 4


def qlora_memory(inputs: MemoryInputs) -> MemoryTerms:
    lora, quant = inputs.settings["lora"], inputs.settings["qlora"]
    note = (f"QLoRA: decoder linears NF4{' + double quant' if quant.double_quant else ''}; embeddings and norms "
            f"upcast to fp32 by peft; LoRA r={lora.r} all-linear in fp32; activations fp32")
    terms = lora_terms(inputs, lora, quantized_weight_bytes(inputs, quant.double_quant), 4, note)
    load_peak = 4 * inputs.shape.num_parameters() + terms.weights if inputs.device == "cpu" else None
    # bitsandbytes under autocast: not checked
    return replace(terms, load_peak=load_peak, autocast_checked=False,
                   weights_dtype="base NF4 + fp32 embeddings and norms, adapters fp32")
