"""What the methods built on peft share: loading a saved peft adapter, switching prompt methods off, and serving
the virtual tokens of prefix and prompt tuning."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from peft import PeftModel

    from tuneforge.methods.registry import AdapterSwitch
    from tuneforge.methods.serving_hooks import LoadedAdapter, ServingHost

_DISABLED = "_tuneforge_virtual_tokens_disabled"


def load_peft_adapter(base: torch.nn.Module, folder: str | Path, is_trainable: bool = False) -> torch.nn.Module:
    """peft's ``PeftModel.from_pretrained`` (LoRA, DoRA, QLoRA, IA3, prefix and prompt tuning)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(folder), is_trainable=is_trainable)


def load_peft_weights_into(model: PeftModel, folder: Path) -> None:
    """``init_from``: the adapter peft saved in ``folder``, copied into the active adapter of ``model`` (made by the
    method's ``apply`` with the same settings): every saved tensor must meet one of the adapter's, of the same
    shape, and read back equal once loaded (so nothing is left at its initial value); ``ValueError`` naming the
    first tensor that does not fit."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    name = model.active_adapter
    assert isinstance(name, str)
    saved = load_peft_weights(str(folder), device="cpu")
    expected = get_peft_model_state_dict(model, adapter_name=name)
    problem = _misfit(saved, expected)
    if problem:
        raise ValueError(f"{folder}: {problem}")
    set_peft_model_state_dict(model, saved, adapter_name=name)
    loaded = get_peft_model_state_dict(model, adapter_name=name)
    for key, tensor in saved.items():
        if not torch.equal(loaded[key].detach().cpu(), tensor.to(loaded[key].dtype)):
            raise ValueError(f"{folder}: tensor {key} did not load into the model as saved")


def _misfit(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """What keeps ``saved`` tensors from being ``expected``'s, in words; "" when they fit."""
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        return (f"its tensors are not this model's adapter ({len(missing)} missing, e.g. {missing[:1]}; "
                f"{len(unexpected)} unexpected, e.g. {unexpected[:1]}): trained with other settings or another model")
    for key, tensor in saved.items():
        if tensor.shape != expected[key].shape:
            return (f"tensor {key} has shape {tuple(tensor.shape)}, this model's {tuple(expected[key].shape)}: "
                    "trained with other settings or another model")
    return ""


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


def load_virtual_tokens(adapter: LoadedAdapter, host: ServingHost, width: int, what: str) -> None:
    """Serving prefix and prompt tuning: keep the saved ``prompt_embeddings`` of shape ``(P, width)`` in the serving
    dtype, and ``P`` as the adapter's ``num_virtual_tokens``."""
    from tuneforge.methods.serving_hooks import AdapterLoadError

    emb = adapter.read_weights(host.device).get("prompt_embeddings")
    if emb is None or emb.ndim != 2 or emb.shape[1] != width:
        got = None if emb is None else tuple(emb.shape)
        raise AdapterLoadError(f"{adapter.path}: {what} of shape {got}, this base model needs (P, {width})")
    adapter.tensors = {"prompt_embeddings": emb.to(host.dtype)}
    adapter.num_virtual_tokens = emb.shape[0]
