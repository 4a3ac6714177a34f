"""Settings of ``method: qlora``'s quantized base: the run config's ``qlora:`` section (LoRA's are under ``lora:``)."""

from __future__ import annotations

from typing import Literal

from tuneforge.schema import Settings


class QuantConfig(Settings):
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    optimizer: Literal["adamw", "paged_adamw_8bit", "adamw_8bit"] = "adamw"
