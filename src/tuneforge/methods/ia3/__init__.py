"""IA3 through peft: ``config.py`` (the ``ia3:`` section), ``model.py`` (apply). Registered as ``method: ia3``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from tuneforge.methods.ia3.config import IA3Config
from tuneforge.methods.ia3.memory import ia3_memory
from tuneforge.methods.ia3.model import apply_ia3
from tuneforge.methods.ia3.serving import IA3Serving
from tuneforge.methods.peft_adapters import load_peft_adapter, load_peft_weights_into, peft_disabled
from tuneforge.methods.registry import Method, register_method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from tuneforge.config import RunConfig

__all__ = ["IA3Config", "apply_ia3"]


def _apply(model: PreTrainedModel, config: RunConfig, tokenizer: Any = None) -> nn.Module:
    return apply_ia3(model, config.ia3)


register_method(Method(
    name="ia3", summary="rescaling vectors on k, v and down_proj",
    memory=ia3_memory, engines=frozenset({"single", "ddp"}),
    settings={"ia3": IA3Config}, apply=_apply,
    load_trained=load_peft_adapter, load_weights=load_peft_weights_into, saved_types=("IA3",),
    mergeable=True, disable=peft_disabled,
    serving=IA3Serving,
))
