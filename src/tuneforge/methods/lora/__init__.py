"""LoRA (and DoRA, rsLoRA) through peft: ``config.py`` (the ``lora:`` section), ``layer.py`` (tuneforge's
fused training forward for peft's LoRA layers), ``model.py`` (apply). Registered as ``method: lora``."""

from tuneforge.methods.lora.config import LoraConfig
from tuneforge.methods.lora.model import apply_lora
from tuneforge.methods.peft_adapters import load_peft_adapter, peft_disabled
from tuneforge.methods.registry import Method, register_method

__all__ = ["LoraConfig", "apply_lora"]

register_method(Method(
    name="lora", summary="B A per target linear (+ DoRA magnitude, rsLoRA scaling)",
    settings={"lora": LoraConfig}, apply=lambda model, config, tokenizer=None: apply_lora(model, config.lora),
    load_trained=load_peft_adapter, saved_types=("LORA",), mergeable=True, disable=peft_disabled,
    mixed_batches=True,
))
