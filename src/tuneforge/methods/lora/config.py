"""Settings of ``method: lora`` (and of the LoRA part of ``qlora``): the run config's ``lora:`` section."""

from __future__ import annotations

from pydantic import Field

from tuneforge.schema import Settings


class LoraConfig(Settings):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    fused_forward: bool = True      # tuneforge's LoRA training forward (methods/lora/layer.py); false: peft's own
    shared_dropout_mask: bool = True  # q/k/v (gate/up) share one dropout mask and one A matmul, as fused-qkv models do
