"""Prompt tuning through peft: ``config.py`` (the ``prompt:`` section), ``model.py`` (apply, the packed
forward, generation). Registered as ``method: prompt``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from tuneforge.methods.peft_adapters import load_peft_adapter, load_peft_weights_into, virtual_tokens_disabled
from tuneforge.methods.prompt_tuning.config import PromptConfig
from tuneforge.methods.prompt_tuning.memory import prompt_memory
from tuneforge.methods.prompt_tuning.model import apply_prompt, forward_for_loss, generate
from tuneforge.methods.prompt_tuning.serving import PromptServing
from tuneforge.methods.registry import Method, register_method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from tuneforge.config import RunConfig

__all__ = ["PromptConfig", "apply_prompt"]


def _apply(model: PreTrainedModel, config: RunConfig, tokenizer: Any = None) -> nn.Module:
    return apply_prompt(model, config.prompt, tokenizer)


register_method(Method(
    name="prompt", summary="a soft prompt of input embeddings",
    memory=prompt_memory, engines=frozenset({"single", "ddp"}),
    settings={"prompt": PromptConfig},
    apply=_apply,
    load_trained=load_peft_adapter, load_weights=load_peft_weights_into, saved_types=("PROMPT_TUNING",),
    forward=forward_for_loss, generate=generate,
    not_mergeable_reason="prompt tuning adds input embeddings, not a change of weights",
    disable=virtual_tokens_disabled, serving=PromptServing,
))
