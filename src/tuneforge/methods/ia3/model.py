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

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

DEFAULT_TARGETS = ["k_proj", "v_proj", "down_proj"]
DEFAULT_FEEDFORWARD = ["down_proj"]
# families whose linears are not named k_proj / v_proj: (attention and feed-forward targets, feed-forward ones)
FAMILY_TARGETS = {"phi3": (["qkv_proj", "down_proj"], ["down_proj"]),
                  "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"])}


def peft_ia3_config(cfg: IA3Config, model_type: str | None = None) -> PeftIA3Config:
    """peft's IA3 config; without ``ia3.target_modules``, the defaults of ``model_type``'s family."""
    default_targets, default_feedforward = FAMILY_TARGETS.get(model_type or "", (DEFAULT_TARGETS, DEFAULT_FEEDFORWARD))
    targets = cfg.target_modules or default_targets
    feedforward = cfg.feedforward_modules if cfg.feedforward_modules is not None else \
        [m for m in default_feedforward if m in targets]
    stray = [m for m in feedforward if m not in targets]
    if stray:
        raise ValueError(f"ia3.feedforward_modules {stray} must also be listed in ia3.target_modules ({targets})")
    return PeftIA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feedforward)


def apply_ia3(model: PreTrainedModel, cfg: IA3Config) -> PeftModel:
    return get_peft_model(model, peft_ia3_config(cfg, getattr(model.config, "model_type", None)))
