"""Inject bottleneck adapters into a causal LM, and save/load them like a peft adapter.

:class:`BottleneckAdapterModel` wraps the base model (as peft's ``PeftModel`` does): the base weights
are frozen, every decoder layer's ``self_attn`` and/or ``mlp`` is replaced by a
:class:`~tuneforge.methods.bottleneck_adapter.layer.BottleneckAdapterLayer` around it, and calling the
wrapper calls the base model. ``save_pretrained`` writes only the adapters, in the same layout as peft:

* ``adapter_config.json``: :class:`BottleneckAdapterConfig` plus ``"adapter_type": "tuneforge.bottleneck_adapter"``;
* ``adapter_model.safetensors``: the adapter tensors, keyed by their name inside the base model
  (e.g. ``model.layers.0.self_attn.adapter_down.weight``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tuneforge.methods.bottleneck_adapter.config import BottleneckAdapterConfig
from tuneforge.methods.bottleneck_adapter.layer import BottleneckAdapterLayer
from tuneforge.methods.registry import NotMergeableError

SUBLAYER_NAMES = {"attention": "self_attn", "mlp": "mlp"}
WEIGHTS_NAME = "adapter_model.safetensors"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a transformers causal LM (``model.model.layers`` for Llama)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"method 'adapter': cannot find the decoder layers of {type(model).__name__} "
                         "(expected model.model.layers as in Llama-style models)")
    return layers


class BottleneckAdapterModel(nn.Module):
    """A frozen causal LM with trainable bottleneck adapters after attention and/or MLP.

    The adapters are kept in fp32 whatever the base dtype (as peft does for its adapters), and their
    output is cast back to the base dtype.

    Args:
        model: the base model (frozen in place; its sub-layers are wrapped in place).
        config: adapter shape and placement.
    """

    def __init__(self, model: nn.Module, config: BottleneckAdapterConfig) -> None:
        super().__init__()
        self.base_model = model
        self.adapter_config = config
        for p in model.parameters():
            p.requires_grad_(False)
        hidden_size = model.config.hidden_size
        for layer in decoder_layers(model):
            for placement in config.placement:
                name = SUBLAYER_NAMES[placement]
                sub = getattr(layer, name)
                if isinstance(sub, BottleneckAdapterLayer):
                    raise ValueError(f"{type(layer).__name__}.{name} already has a bottleneck adapter")
                wrapped = BottleneckAdapterLayer(sub, hidden_size, config.bottleneck, config.nonlinearity,
                                                 config.dropout, config.scaling)
                setattr(layer, name, wrapped)

    # ----------------------------------------------------------------------------------- inference

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The base model, still with the adapter layers in it (use :meth:`disable_adapter` to bypass them)."""
        return self.base_model

    def adapter_layers(self) -> Iterator[BottleneckAdapterLayer]:
        return (m for m in self.base_model.modules() if isinstance(m, BottleneckAdapterLayer))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes exactly the base model."""
        layers = list(self.adapter_layers())
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    def merge_and_unload(self) -> nn.Module:
        raise NotMergeableError(
            "method 'adapter' cannot be merged into the base weights: a bottleneck adapter has a nonlinearity "
            "between its two projections, so it is not a linear map that could be added to a weight matrix. "
            "Serve the base model with the adapter loaded instead (tuneforge.methods.load_trained)."
        )

    # ------------------------------------------------------------------------------ save and load

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter tensors keyed by their name inside the base model."""
        return {name: p.detach() for name, p in self.base_model.named_parameters() if ".adapter_" in name}

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.adapter_config
        config.base_model_name_or_path = config.base_model_name_or_path or getattr(
            self.base_model, "name_or_path", None) or None
        config.save(folder)
        tensors = {k: v.contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "adapter_type": "tuneforge.bottleneck_adapter"})

    @classmethod
    def from_pretrained(cls, model: nn.Module, folder: str | Path, is_trainable: bool = False) -> "BottleneckAdapterModel":
        """Wrap ``model`` and load the adapters saved in ``folder``; every adapter tensor must match."""
        folder = Path(folder)
        config = BottleneckAdapterConfig.load(folder)
        wrapped = cls(model, config)
        saved = load_file(str(folder / WEIGHTS_NAME))
        expected = wrapped.adapter_state_dict()
        missing = sorted(set(expected) - set(saved))
        unexpected = sorted(set(saved) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{folder / WEIGHTS_NAME} does not fit this base model: missing={missing[:4]} "
                             f"unexpected={unexpected[:4]} (was it trained on a different model?)")
        params = dict(wrapped.base_model.named_parameters())
        with torch.no_grad():
            for name, tensor in saved.items():
                if params[name].shape != tensor.shape:
                    raise ValueError(f"{name}: saved shape {tuple(tensor.shape)} != model shape {tuple(params[name].shape)}")
                params[name].copy_(tensor)
        for name, p in wrapped.base_model.named_parameters():
            p.requires_grad_(is_trainable and ".adapter_" in name)
        return wrapped

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)
