"""IA3 (Liu et al. 2022) through peft: learned rescaling of activations.

For an attention target (``k_proj``, ``v_proj``) the output is rescaled: ``y = l ⊙ (W x)`` with
``l: (d_out,)``; for a feed-forward target (``down_proj``) the input is: ``y = W (l ⊙ x)`` with
``l: (d_in,)``. All ``l`` start at 1, so training starts exactly at the base model. Trainable parameters:
``d_out`` per attention target and ``d_in`` per feed-forward target, per layer. Mergeable: ``l`` folds
into ``W`` by scaling its rows (attention) or columns (feed-forward).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft import IA3Config as PeftIA3Config
from peft import get_peft_model

from tuneforge.methods.ia3.config import IA3Config
from tuneforge.methods.ia3.memory import ia3_targets

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def peft_ia3_config(cfg: IA3Config, model_type: str | None = None) -> PeftIA3Config:
    """peft's IA3 config; without ``ia3.target_modules``, the defaults of ``model_type``'s family."""
    targets, feedforward = ia3_targets(cfg.target_modules, cfg.feedforward_modules, model_type)
    stray = [m for m in feedforward if m not in targets]
    if stray:
        raise ValueError(f"ia3.feedforward_modules {stray} must also be listed in ia3.target_modules ({targets})")
    return PeftIA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feedforward)


def apply_ia3(model: PreTrainedModel, cfg: IA3Config) -> PeftModel:
    return get_peft_model(model, peft_ia3_config(cfg, getattr(model.config, "model_type", None)))
