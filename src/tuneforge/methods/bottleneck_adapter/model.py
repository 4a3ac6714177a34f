"""Inject bottleneck adapters into a causal LM, and save/load/switch them like peft's named adapters.

:class:`BottleneckAdapterModel` wraps the base model (as peft's ``PeftModel`` does): the base weights
are frozen, every decoder layer's ``self_attn`` and/or ``mlp`` is replaced by a
:class:`~tuneforge.methods.bottleneck_adapter.layer.BottleneckAdapterLayer` around it, and calling the
wrapper calls the base model. Several adapters can live in one model under names (``load_adapter``,
``set_adapter``, ``delete_adapter``, ``disable_adapter``), so one base serves many tasks and a trained
adapter, disabled, is its own reference model. ``save_pretrained`` writes one adapter, in the same
layout as peft:

* ``adapter_config.json``: :class:`BottleneckAdapterConfig` plus ``"adapter_type": "tuneforge.bottleneck_adapter"``;
* ``adapter_model.safetensors``: the adapter tensors, keyed by their name inside the base model without
  the adapter name (e.g. ``model.layers.0.self_attn.adapter_down.weight``), as peft does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tuneforge.methods.bottleneck_adapter.config import ADAPTER_TYPE, BottleneckAdapterConfig
from tuneforge.methods.bottleneck_adapter.layer import DEFAULT_ADAPTER, BottleneckAdapterLayer
from tuneforge.methods.errors import NotMergeableError
from tuneforge.methods.registry import Generates

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SUBLAYER_NAMES = {"attention": "self_attn", "mlp": "mlp"}
OTHER_SUBLAYER_NAMES = {"self_attn": "attention"}     # GPT-NeoX's decoder layer calls its attention `attention`
WEIGHTS_NAME = "adapter_model.safetensors"
_TABLES = ("adapter_down", "adapter_up")


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The list of decoder layers of a transformers causal LM (``model.model.layers`` for Llama)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"method 'adapter': cannot find the decoder layers of {type(model).__name__} "
                         "(expected model.model.layers as in Llama-style models)")
    return layers


def _saved_key(name: str, adapter_name: str) -> str | None:
    """``...adapter_down.<adapter_name>.weight`` -> ``...adapter_down.weight`` (None for another adapter's tensor)."""
    for table in _TABLES:
        marker = f".{table}.{adapter_name}."
        if marker in name:
            return name.replace(marker, f".{table}.")
    return None


class BottleneckAdapterModel(nn.Module):
    """A frozen causal LM with trainable bottleneck adapters after attention and/or MLP.

    The adapters are kept in fp32 whatever the base dtype (as peft does for its adapters), and their
    output is cast back to the base dtype.

    Args:
        model: the base model (frozen in place; its sub-layers are wrapped in place).
        config: adapter shape and placement.
        adapter_name: name of this first adapter (it is active and trainable).
    """

    def __init__(self, model: PreTrainedModel, config: BottleneckAdapterConfig,
                 adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        self.base_model = model
        self.configs: dict[str, BottleneckAdapterConfig] = {}
        self._active: str | None = None
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config)

    # ------------------------------------------------------------------------------ named adapters

    def add_adapter(self, adapter_name: str, config: BottleneckAdapterConfig) -> None:
        """Insert a new zero-initialised adapter ``adapter_name`` into every placement of ``config``."""
        if adapter_name in self.configs:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it first or pick another name")
        hidden_size = self.base_model.config.hidden_size
        for layer in decoder_layers(self.base_model):
            for placement in config.placement:
                name = SUBLAYER_NAMES[placement]
                if not hasattr(layer, name) and hasattr(layer, OTHER_SUBLAYER_NAMES.get(name, "")):
                    name = OTHER_SUBLAYER_NAMES[name]
                sub = getattr(layer, name)
                if isinstance(sub, BottleneckAdapterLayer):
                    sub.add_adapter(adapter_name, config.bottleneck, config.nonlinearity, config.dropout,
                                    config.scaling)
                else:
                    wrapped = BottleneckAdapterLayer(sub, hidden_size, config.bottleneck, config.nonlinearity,
                                                     config.dropout, config.scaling, adapter_name)
                    setattr(layer, name, wrapped)
        self.configs[adapter_name] = config
        # the first adapter becomes active; a later one does not, and layers it created must not apply it
        self.set_adapter(self._active or adapter_name)

    @property
    def active_adapter(self) -> str | None:
        return self._active

    @property
    def adapter_config(self) -> BottleneckAdapterConfig:
        """The active adapter's config."""
        return self.configs[self.active_adapter or next(iter(self.configs))]

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one every wrapped layer applies (a layer without it applies none)."""
        if adapter_name not in self.configs:
            raise KeyError(f"no adapter named {adapter_name!r} (have: {', '.join(self.configs)})")
        self._active = adapter_name
        for layer in self.adapter_layers():
            layer.active_adapter = adapter_name if adapter_name in layer.adapter_down else None

    def delete_adapter(self, adapter_name: str) -> None:
        for layer in self.adapter_layers():
            if adapter_name in layer.adapter_down:
                layer.delete_adapter(adapter_name)
        del self.configs[adapter_name]
        if self._active == adapter_name:
            self._active = None

    def load_adapter(self, folder: str | Path, adapter_name: str, is_trainable: bool = False) -> None:
        """Add the adapter saved in ``folder`` under ``adapter_name`` (not made active: call :meth:`set_adapter`)."""
        folder = Path(folder)
        self.add_adapter(adapter_name, BottleneckAdapterConfig.load(folder))
        try:
            self.load_weights(folder, adapter_name)
        except ValueError:
            self.delete_adapter(adapter_name)
            raise
        for _, param in self._adapter_parameters(adapter_name):
            param.requires_grad_(is_trainable)

    def load_weights(self, folder: str | Path, adapter_name: str | None = None) -> None:
        """Copy the adapter saved in ``folder`` into the existing adapter ``adapter_name`` (default: the active
        one); every saved tensor must meet one of the adapter's with the same shape, and every one of the adapter's
        must be saved (``ValueError`` otherwise, the adapter unchanged)."""
        folder = Path(folder)
        adapter_name = adapter_name or self.active_adapter or DEFAULT_ADAPTER
        saved = load_file(str(folder / WEIGHTS_NAME))
        params = dict(self._adapter_parameters(adapter_name))
        missing = sorted(set(params) - set(saved))
        unexpected = sorted(set(saved) - set(params))
        if missing or unexpected:
            raise ValueError(f"{folder / WEIGHTS_NAME} does not fit this base model: missing={missing[:4]} "
                             f"unexpected={unexpected[:4]} (was it trained on a different model?)")
        for key, tensor in saved.items():
            if params[key].shape != tensor.shape:
                raise ValueError(f"{key}: saved shape {tuple(tensor.shape)} != model shape "
                                 f"{tuple(params[key].shape)}")
        with torch.no_grad():
            for key, tensor in saved.items():
                params[key].copy_(tensor)

    def _adapter_parameters(self, adapter_name: str) -> list[tuple[str, nn.Parameter]]:
        """The parameters of adapter ``adapter_name``, keyed as saved (without the name)."""
        return [(key, p) for n, p in self.base_model.named_parameters()
                if (key := _saved_key(n, adapter_name)) is not None]

    # ----------------------------------------------------------------------------------- inference

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return cast(Generates, self.base_model).generate(*args, **kwargs)

    def get_base_model(self) -> PreTrainedModel:
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

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Tensors of adapter ``adapter_name`` (default: the active one) keyed as saved (without the name)."""
        adapter_name = adapter_name or self.active_adapter or DEFAULT_ADAPTER
        out = {}
        for name, p in self.base_model.named_parameters():
            key = _saved_key(name, adapter_name)
            if key is not None:
                out[key] = p.detach()
        return out

    def save_pretrained(self, folder: str | Path, adapter_name: str | None = None, **_: Any) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        adapter_name = adapter_name or self.active_adapter or DEFAULT_ADAPTER
        base_name = getattr(self.base_model, "name_or_path", None) or None
        self.configs[adapter_name].save(folder, base_name)
        tensors = {k: v.contiguous().cpu() for k, v in self.adapter_state_dict(adapter_name).items()}
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "adapter_type": ADAPTER_TYPE})

    @classmethod
    def from_pretrained(cls, model: PreTrainedModel, folder: str | Path, is_trainable: bool = False,
                        adapter_name: str = DEFAULT_ADAPTER) -> "BottleneckAdapterModel":
        """Wrap ``model`` and load the adapter saved in ``folder`` as ``adapter_name``; every tensor must match."""
        folder = Path(folder)
        wrapped = cls.__new__(cls)
        nn.Module.__init__(wrapped)
        wrapped.base_model = model
        wrapped.configs = {}
        wrapped._active = None
        for p in model.parameters():
            p.requires_grad_(False)
        wrapped.load_adapter(folder, adapter_name, is_trainable=is_trainable)
        wrapped.set_adapter(adapter_name)
        return wrapped

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)


