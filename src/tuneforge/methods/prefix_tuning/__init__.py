"""Prefix tuning through peft: ``config.py`` (the ``prefix:`` section), ``model.py`` (apply, the packed
forward, generation). Registered as ``method: prefix``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from tuneforge.methods.peft_adapters import load_peft_adapter, virtual_tokens_disabled
from tuneforge.methods.prefix_tuning.config import PrefixConfig
from tuneforge.methods.prefix_tuning.model import apply_prefix, forward_for_loss, generate
from tuneforge.methods.registry import Method, register_method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from tuneforge.config import RunConfig

__all__ = ["PrefixConfig", "apply_prefix"]


def _apply(model: PreTrainedModel, config: RunConfig, tokenizer: Any = None) -> nn.Module:
    return apply_prefix(model, config.prefix)


register_method(Method(
    name="prefix", summary="per-layer key/value prefixes",
    settings={"prefix": PrefixConfig}, apply=_apply,
    load_trained=load_peft_adapter, saved_types=("PREFIX_TUNING",), forward=forward_for_loss, generate=generate,
    not_mergeable_reason="prefix tuning adds key/value vectors, not a change of weights",
    disable=virtual_tokens_disabled,
))
