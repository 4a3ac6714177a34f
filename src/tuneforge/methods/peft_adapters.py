"""What the methods built on peft share: loading a saved peft adapter, and switching prompt methods off."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from peft import PeftModel

    from tuneforge.methods.registry import AdapterSwitch

_DISABLED = "_tuneforge_virtual_tokens_disabled"


def load_peft_adapter(base: torch.nn.Module, folder: str | Path, is_trainable: bool = False) -> torch.nn.Module:
    """peft's ``PeftModel.from_pretrained`` (LoRA, DoRA, QLoRA, IA3, prefix and prompt tuning)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(folder), is_trainable=is_trainable)


def peft_disabled(model: AdapterSwitch) -> contextlib.AbstractContextManager:
    """peft's ``disable_adapter()``: the LoRA/IA3 layers compute the base layer alone."""
    return model.disable_adapter()


@contextlib.contextmanager
def virtual_tokens_disabled(model: PeftModel) -> Iterator[None]:
    """Prefix/prompt tuning off: peft's ``disable_adapter()`` for ``model(...)``, and a flag that tuneforge's
    packed forward and generate paths (which call the base model themselves) read."""
    setattr(model, _DISABLED, True)
    try:
        with model.disable_adapter():
            yield
    finally:
        setattr(model, _DISABLED, False)


def virtual_tokens_are_disabled(model: torch.nn.Module) -> bool:
    return bool(getattr(model, _DISABLED, False))
