"""QLoRA: LoRA over a 4/8-bit frozen base (bitsandbytes). ``config.py`` (the ``qlora:`` section; LoRA's
settings stay under ``lora:``), ``model.py`` (quantize, apply, optimizers). Registered as ``method: qlora``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tuneforge.methods.lora.export import gguf_lora_problems, vllm_support
from tuneforge.methods.peft_adapters import load_peft_adapter, load_peft_weights_into, peft_disabled
from tuneforge.methods.qlora.config import QuantConfig
from tuneforge.methods.qlora.memory import qlora_memory
from tuneforge.methods.qlora.model import apply_qlora, load_base, make_optimizer
from tuneforge.methods.registry import Method, Runtimes, register_method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from tuneforge.config import RunConfig

__all__ = ["QuantConfig", "apply_qlora"]


def _apply(model: PreTrainedModel, config: RunConfig, tokenizer: Any = None) -> nn.Module:
    return apply_qlora(model, config.lora, config.qlora, gradient_checkpointing=config.gradient_checkpointing)


def _make_optimizer(config: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return make_optimizer(params, config.qlora.optimizer, config.learning_rate, config.weight_decay)


def _check_config(config: RunConfig) -> None:
    if config.dtype == "fp32" and config.qlora.compute_dtype not in ("auto", "fp32"):
        raise ValueError("qlora.compute_dtype must match dtype fp32 (or be 'auto')")


register_method(Method(
    name="qlora", summary="LoRA over a 4/8-bit frozen base (NF4/FP4, double quant, int8)",
    memory=qlora_memory, engines=frozenset({"single", "ddp"}), check_config=_check_config,
    engine_notes={"fsdp2": "4-bit weights lose their quantisation state when FSDP2 gathers them; train QLoRA with "
                           "DDP (distributed_type MULTI_GPU) or on one GPU"},
    settings={"qlora": QuantConfig}, reads=("lora",),
    apply=_apply,
    load_trained=load_peft_adapter, load_weights=load_peft_weights_into, saved_types=(), load_base=load_base,
    make_optimizer=_make_optimizer,
    mergeable=True, disable=peft_disabled, mixed_batches=True,
    # its adapter is saved as LoRA (peft_type LORA): the server loads it through the lora record's serving
    runtimes=Runtimes(vllm=vllm_support, gguf_lora=gguf_lora_problems),
    merge_reversible=False,                  # merging into 4-bit weights is lossy
))
