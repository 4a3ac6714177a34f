"""Sampling through merged copies of the LoRA weights: one matmul per adapted linear instead of three.

GRPO samples completions with the weights it is training, one token at a time for the whole batch; at that size a
LoRA layer's two skinny matmuls, scaling and add cost about as much as the base matmul they sit beside.
:func:`merged_copies` gives every adapted linear a fresh weight ``W + delta`` (peft's ``get_delta_weight``: ``s B A``)
and turns the LoRA branches off (peft's ``disable_adapter``) for the length of the block, then puts the original
weight tensors back: the very same objects, never written (unlike peft's ``merge_adapter`` / ``unmerge_adapter``,
whose ``W + d - d`` leaves rounding in the base weights, which would make a resumed run differ from an
uninterrupted one). It costs one copy of the adapted weights while the block lasts.

All or nothing: the block merges only when every peft layer of the model is a plain LoRA linear (one active adapter,
not DoRA, not merged already) over an ``nn.Linear`` (not 4/8-bit), because disabling the adapter turns every
peft layer off (``modules_to_save``, trainable token rows, DoRA): otherwise it changes nothing. It yields whether
it merged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft.tuners.lora import layer as peft_lora
from peft.tuners.tuners_utils import BaseTunerLayer


def _mergeable(module: torch.nn.Module) -> bool:
    if not isinstance(module, peft_lora.Linear) or module.merged or len(module.active_adapters) != 1:
        return False
    name = module.active_adapters[0]
    return (name in module.lora_A and not module.use_dora.get(name, False)
            and type(module.get_base_layer()) is torch.nn.Linear)


@contextlib.contextmanager
def merged_copies(model: torch.nn.Module) -> Iterator[bool]:
    """Within the block ``model`` computes through merged weight copies (module docstring); yields whether it does."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    disable = getattr(model, "disable_adapter", None)
    if not layers or disable is None or not all(_mergeable(m) for m in layers):
        yield False
        return
    swapped: list[tuple[torch.nn.Linear, torch.nn.Parameter]] = []
    try:
        with torch.no_grad():
            for layer in layers:
                assert isinstance(layer, peft_lora.Linear)
                base = layer.get_base_layer()
                weight = base.weight
                merged = weight + layer.get_delta_weight(layer.active_adapters[0]).to(weight.dtype)
                base.weight = torch.nn.Parameter(merged, requires_grad=False)
                swapped.append((base, weight))
        with disable():
            yield True
    finally:
        for base, weight in swapped:
            base.weight = weight
