"""Prompt tuning through peft: ``config.py`` (the ``prompt:`` section), ``model.py`` (apply, the packed
forward, generation). Registered as ``method: prompt``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from tuneforge.errors import ConfigError
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
    _refuse_window(model, config)
    return apply_prompt(model, config.prompt, tokenizer)


def _refuse_window(model: PreTrainedModel, config: RunConfig) -> None:
    """A model whose every layer slides a window (Mistral v0.1, 4096 tokens; no full-attention layer as Gemma 2 / 3
    have) shows the ``P`` virtual tokens, which sit before the text, only to its first ``window - P`` positions:
    past them nothing trains the soft prompt. Refuse when an example of ``data.max_length`` tokens would reach past
    the window."""
    c = model.config
    window = getattr(c, "sliding_window", None)
    layer_types = getattr(c, "layer_types", None)
    if window is None or (layer_types is not None and "full_attention" in layer_types) or \
            getattr(c, "use_sliding_window", True) is False:
        return
    P, length = config.prompt.num_virtual_tokens, config.data.max_length
    if P + length > window:
        raise ConfigError(f"method prompt on {c.model_type}: its sliding window ({window} tokens) would hide the "
                          f"{P} virtual tokens from positions past {window - P}; set data.max_length to at most "
                          f"{max(window - P, 0)} or use lora, adapter or ia3")


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
