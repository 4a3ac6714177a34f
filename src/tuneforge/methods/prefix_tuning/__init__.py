"""Prefix tuning through peft: ``config.py`` (the ``prefix:`` section), ``model.py`` (apply, the packed
forward, generation). Registered as ``method: prefix``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.methods.peft_adapters import load_peft_adapter, load_peft_weights_into, virtual_tokens_disabled
from tuneforge.methods.prefix_tuning.config import PrefixConfig
from tuneforge.methods.prefix_tuning.memory import prefix_memory
from tuneforge.methods.prefix_tuning.model import apply_prefix, forward_for_loss, generate
from tuneforge.methods.prefix_tuning.serving import PrefixServing
from tuneforge.methods.registry import Method, register_method

if TYPE_CHECKING:
    from pathlib import Path

    from peft import PeftModel
    from transformers import PreTrainedModel

    from tuneforge.config import RunConfig

__all__ = ["PrefixConfig", "apply_prefix"]


def _apply(model: PreTrainedModel, config: RunConfig, tokenizer: Any = None) -> nn.Module:
    _refuse_attention(model)
    return apply_prefix(model, config.prefix)


def _refuse_attention(model: PreTrainedModel) -> None:
    """Gemma 2's soft-capped scores need eager attention, which the prefix's SDPA path lacks, and a sliding window
    is lost with the prefix in the KV cache (Gemma 2 / 3 build their sliding layers' cache masks without the
    prefix's virtual positions; Mistral's cached and packed paths run without the window): refuse them up front."""
    c = model.config
    softcap = getattr(c, "attn_logit_softcapping", None)
    layer_types = getattr(c, "layer_types", None)
    sliding = ("sliding_attention" in layer_types if layer_types is not None
               else getattr(c, "sliding_window", None) is not None)      # Mistral, Phi-3: one window, every layer
    if softcap is not None or sliding:
        what = "soft-capped attention scores" if softcap is not None else "sliding-window attention layers"
        raise ConfigError(f"method prefix does not support {c.model_type} ({what}): use lora, adapter, prompt or "
                          "ia3")


def _check_config(config: RunConfig) -> None:
    if config.gradient_checkpointing:
        # transformers drops the cache under activation checkpointing ("Caching is incompatible with gradient
        # checkpointing"): the prefix's keys and values would vanish and the explicit mask no longer fit them
        raise ValueError("method prefix with gradient_checkpointing: transformers drops the prefix's key/value cache "
                         "under activation checkpointing; set gradient_checkpointing: false (or use prompt tuning)")


def _load_weights(model: PeftModel, folder: Path) -> None:
    """``init_from``: a saved prefix into the model's; a run with ``reparameterize: true`` saved the prefix its MLP
    made, not the MLP, so it cannot continue as it trained."""
    if model.active_peft_config.prefix_projection:
        raise ValueError(f"{folder}: prefix.reparameterize: true saves only the prefix its MLP made, not the MLP: "
                         "such a run cannot continue training; train a new prefix from model: instead")
    load_peft_weights_into(model, folder)


register_method(Method(
    name="prefix", summary="per-layer key/value prefixes",
    memory=prefix_memory, engines=frozenset({"single", "ddp"}), check_config=_check_config,
    settings={"prefix": PrefixConfig}, apply=_apply,
    load_trained=load_peft_adapter, load_weights=_load_weights, saved_types=("PREFIX_TUNING",),
    forward=forward_for_loss, generate=generate,
    not_mergeable_reason="prefix tuning adds key/value vectors, not a change of weights",
    disable=virtual_tokens_disabled, serving=PrefixServing,
))
