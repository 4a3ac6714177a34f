"""QLoRA: LoRA over a 4/8-bit frozen base (bitsandbytes). ``config.py`` (the ``qlora:`` section; LoRA's
settings stay under ``lora:``), ``model.py`` (quantize, apply, optimizers). Registered as ``method: qlora``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tuneforge.methods.peft_adapters import load_peft_adapter, peft_disabled
from tuneforge.methods.qlora.config import QuantConfig
from tuneforge.methods.qlora.model import apply_qlora, load_base, make_optimizer
from tuneforge.methods.registry import Method, register_method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from tuneforge.config import RunConfig

__all__ = ["QuantConfig", "apply_qlora"]


def _apply(model: PreTrainedModel, config: RunConfig, tokenizer: Any = None) -> nn.Module:
    return apply_qlora(model, config.lora, config.qlora, gradient_checkpointing=config.gradient_checkpointing)


def _make_optimizer(config: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return make_optimizer(params, config.qlora.optimizer, config.learning_rate, config.weight_decay)


register_method(Method(
    name="qlora", summary="LoRA over a 4/8-bit frozen base (NF4/FP4, double quant, int8)",
    settings={"qlora": QuantConfig},
    apply=_apply,
    load_trained=load_peft_adapter, saved_types=(), load_base=load_base,
    make_optimizer=_make_optimizer,
    mergeable=True, disable=peft_disabled, mixed_batches=True,
))
