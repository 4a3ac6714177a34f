"""IA3 through peft: ``config.py`` (the ``ia3:`` section), ``model.py`` (apply). Registered as ``method: ia3``."""

from tuneforge.methods.ia3.config import IA3Config
from tuneforge.methods.ia3.model import apply_ia3
from tuneforge.methods.peft_adapters import load_peft_adapter, peft_disabled
from tuneforge.methods.registry import Method, register_method

__all__ = ["IA3Config", "apply_ia3"]

register_method(Method(
    name="ia3", summary="rescaling vectors on k, v and down_proj",
    settings={"ia3": IA3Config}, apply=lambda model, config, tokenizer=None: apply_ia3(model, config.ia3),
    load_trained=load_peft_adapter, saved_types=("IA3",), mergeable=True, disable=peft_disabled,
))
