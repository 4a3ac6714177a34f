"""LoRA (and DoRA, rsLoRA) through peft: ``config.py`` (the ``lora:`` section), ``layer.py`` (tuneforge's
fused training forward for peft's LoRA layers), ``model.py`` (apply), ``serving.py`` (per-row serving),
``export.py`` (what vLLM and llama.cpp make of the saved adapter). Registered as ``method: lora``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from tuneforge.methods.lora.config import LoraConfig
from tuneforge.methods.lora.export import gguf_lora_problems, vllm_support
from tuneforge.methods.lora.memory import lora_memory
from tuneforge.methods.lora.model import apply_lora
from tuneforge.methods.lora.sampling import merged_copies
from tuneforge.methods.lora.serving import LoraServing
from tuneforge.methods.peft_adapters import load_peft_adapter, load_peft_weights_into, peft_disabled
from tuneforge.methods.registry import Method, Runtimes, register_method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from tuneforge.config import RunConfig

__all__ = ["LoraConfig", "apply_lora"]


def _apply(model: PreTrainedModel, config: RunConfig, tokenizer: Any = None) -> nn.Module:
    return apply_lora(model, config.lora)


register_method(Method(
    name="lora", summary="B A per target linear (+ DoRA magnitude, rsLoRA scaling)",
    memory=lora_memory, engines=frozenset({"single", "ddp", "fsdp2", "deepspeed"}), leaner="qlora",
    settings={"lora": LoraConfig}, apply=_apply,
    load_trained=load_peft_adapter, load_weights=load_peft_weights_into, saved_types=("LORA",),
    mergeable=True, disable=peft_disabled,
    mixed_batches=True, merged_sampling=merged_copies,
    serving=LoraServing, runtimes=Runtimes(vllm=vllm_support, gguf_lora=gguf_lora_problems),
))
