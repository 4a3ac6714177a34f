"""QLoRA: LoRA over a 4/8-bit frozen base (bitsandbytes). ``config.py`` (the ``qlora:`` section; LoRA's
settings stay under ``lora:``), ``model.py`` (quantize, apply, optimizers). Registered as ``method: qlora``."""

from tuneforge.methods.peft_adapters import load_peft_adapter, peft_disabled
from tuneforge.methods.qlora.config import QuantConfig
from tuneforge.methods.qlora.model import apply_qlora, load_base, make_optimizer
from tuneforge.methods.registry import Method, register_method

__all__ = ["QuantConfig", "apply_qlora"]

register_method(Method(
    name="qlora", summary="LoRA over a 4/8-bit frozen base (NF4/FP4, double quant, int8)",
    settings={"qlora": QuantConfig},
    apply=lambda model, config, tokenizer=None: apply_qlora(model, config.lora, config.qlora,
                                                            gradient_checkpointing=config.gradient_checkpointing),
    load_trained=load_peft_adapter, saved_types=(), load_base=load_base,
    make_optimizer=lambda config, params: make_optimizer(params, config.qlora.optimizer, config.learning_rate,
                                                         config.weight_decay),
    mergeable=True, disable=peft_disabled, mixed_batches=True,
))
