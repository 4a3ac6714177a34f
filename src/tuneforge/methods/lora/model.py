"""LoRA (and DoRA, rsLoRA) through peft.

LoRA replaces a frozen linear layer ``W0`` by ``x -> W0 x + (alpha / r) * B A x`` with ``A: (r, d_in)``
(Kaiming-uniform init) and ``B: (d_out, r)`` (zeros), so training starts exactly at the base model.
rsLoRA scales by ``alpha / sqrt(r)`` instead; DoRA additionally learns a per-output-row magnitude.
Trainable parameters per target linear: ``r * (d_in + d_out)`` (+ ``d_out`` for DoRA).
In training, the LoRA layers run tuneforge's fused forward (:mod:`tuneforge.methods.lora.layer`: dropout
fused into ``A``, one mask and one matmul for q/k/v's and gate/up's ``A``, ``B`` fused into the residual
add; the same training in fewer passes and less memory); ``lora.fused_forward: false`` keeps peft's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from tuneforge.errors import ConfigError
from tuneforge.methods.lora.config import LoraConfig
from tuneforge.methods.lora.layer import fuse_lora_forward

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def peft_lora_config(cfg: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft accepts floats
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(model: PreTrainedModel, cfg: LoraConfig) -> PeftModel:
    """peft's LoRA on ``model``, with tuneforge's fused training forward unless ``cfg.fused_forward`` is off."""
    try:
        peft_model = get_peft_model(model, peft_lora_config(cfg))
    except ValueError as e:     # peft adapts an MoE's stacked expert weights as parameters: no dropout there
        if "does not work with lora_dropout" not in str(e):
            raise
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(f"lora.dropout: {cfg.dropout} cannot apply to {kind}'s expert weights (peft adapts the "
                          "stacked experts as parameters, where dropout is not possible): set lora.dropout: 0, or "
                          "leave the experts out with lora.target_modules") from None
    if cfg.fused_forward:
        fuse_lora_forward(peft_model, shared_dropout_mask=cfg.shared_dropout_mask)
    return peft_model
