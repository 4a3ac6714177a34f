"""Bottleneck adapters (Houlsby et al. 2019): our own method, in peft's three-file shape.

* ``config.py``: :class:`BottleneckAdapterConfig`, the ``adapter:`` section, saved as ``adapter_config.json``.
* ``layer.py``: :class:`BottleneckAdapterLayer`, named adapters wrapped around one sub-layer.
* ``model.py``: :class:`BottleneckAdapterModel`, injects the layers, saves, loads and switches adapters.

Registered here as ``method: adapter``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.methods.bottleneck_adapter.config import ADAPTER_TYPE, BottleneckAdapterConfig
from tuneforge.methods.bottleneck_adapter.layer import BottleneckAdapterLayer
from tuneforge.methods.bottleneck_adapter.memory import adapter_memory
from tuneforge.methods.bottleneck_adapter.model import BottleneckAdapterModel
from tuneforge.methods.bottleneck_adapter.serving import BottleneckServing
from tuneforge.methods.errors import NotMergeableError
from tuneforge.methods.registry import Method, register_method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from tuneforge.config import RunConfig

__all__ = ["ADAPTER_TYPE", "BottleneckAdapterConfig", "BottleneckAdapterLayer", "BottleneckAdapterModel",
           "NotMergeableError"]


def _apply(model: PreTrainedModel, config: RunConfig, tokenizer: Any = None) -> BottleneckAdapterModel:
    return BottleneckAdapterModel(model, config.adapter)


def _load_trained(base: PreTrainedModel, folder: str | Path, is_trainable: bool = False) -> BottleneckAdapterModel:
    return BottleneckAdapterModel.from_pretrained(base, folder, is_trainable=is_trainable)


def _load_weights(model: BottleneckAdapterModel, folder: Path) -> None:
    model.load_weights(folder)


def _disable(model: BottleneckAdapterModel) -> contextlib.AbstractContextManager:
    return model.disable_adapter()


register_method(Method(
    name="adapter", summary="bottleneck MLPs after attention and/or MLP (ours)",
    memory=adapter_memory, engines=frozenset({"single", "ddp"}),
    settings={"adapter": BottleneckAdapterConfig}, apply=_apply,
    load_trained=_load_trained, load_weights=_load_weights,
    saved_types=(ADAPTER_TYPE,),
    not_mergeable_reason="a bottleneck adapter has a nonlinearity between its projections",
    disable=_disable, serving=BottleneckServing,
))
