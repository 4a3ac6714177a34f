"""Bottleneck adapters wrapped around one sub-layer (attention or MLP) of a decoder layer.

For a sub-layer ``f`` with output ``y = f(x)`` of width ``d``, the wrapped layer returns, with the
active adapter,

    y + s * W_up · act(W_down · y + b_down) + s * b_up

with ``W_down: (b, d)``, ``b_down: (b,)``, ``W_up: (d, b)``, ``b_up: (d,)`` and scaling ``s``. The decoder
layer then adds its residual as before, so per decoder layer: ``h = x + adapter(attn(norm(x)))``.
``W_down`` uses nn.Linear's default (Kaiming-uniform) init; ``W_up`` and ``b_up`` start at zero, so the
wrapped layer returns exactly ``y`` before the first step and training starts at the base model.
Trainable parameters per adapter: ``2·d·b + b + d``. There is no merge into the base weights: the
nonlinearity between the two projections makes the adapter not a linear map.

Named adapters, as peft's layers hold them: ``adapter_down[name]``, ``adapter_up[name]`` (and the
activation, dropout and scaling of each name). One is active at a time (``active_adapter``); with
``disabled`` set, or no active adapter, the layer is exactly the wrapped sub-layer.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
DEFAULT_ADAPTER = "default"


class BottleneckAdapterLayer(nn.Module):
    """``base_layer`` followed by a residual bottleneck on its output.

    Args:
        base_layer: the wrapped sub-layer; its output is a tensor ``(..., d)`` or a tuple whose first item is.
        hidden_size: ``d``.
        bottleneck: ``b`` of the first adapter, named ``adapter_name``.
        nonlinearity: key of :data:`ACTIVATIONS`.
        dropout: dropout probability on the bottleneck activations.
        scaling: ``s``.
        adapter_name: name of the first adapter (more with :meth:`add_adapter`).
    """

    def __init__(self, base_layer: nn.Module, hidden_size: int, bottleneck: int, nonlinearity: str = "gelu",
                 dropout: float = 0.0, scaling: float = 1.0, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.hidden_size = hidden_size
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self.add_adapter(adapter_name, bottleneck, nonlinearity, dropout, scaling)

    def add_adapter(self, name: str, bottleneck: int, nonlinearity: str = "gelu", dropout: float = 0.0,
                    scaling: float = 1.0) -> None:
        """Add a zero-initialised adapter ``name`` (it becomes active only through :meth:`set_adapter`,
        except the first one)."""
        if name in self.adapter_down:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        weight = next(self.base_layer.parameters(), None)
        factory = {"device": weight.device} if weight is not None else {}
        self.adapter_down[name] = nn.Linear(self.hidden_size, bottleneck, bias=True, **factory)
        up = nn.Linear(bottleneck, self.hidden_size, bias=True, **factory)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.adapter_up[name] = up
        self.adapter_act[name] = ACTIVATIONS[nonlinearity]()
        self.adapter_dropout[name] = nn.Dropout(dropout)
        self.scaling[name] = scaling
        if self.active_adapter is None:
            self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        for table in (self.adapter_down, self.adapter_up, self.adapter_act, self.adapter_dropout):
            del table[name]
        del self.scaling[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.adapter_down:
            raise KeyError(f"no adapter named {name!r} (have: {', '.join(self.adapter_down)})")
        self.active_adapter = name

    def adapt(self, y: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """``y (..., d) -> y + s * up(dropout(act(down(y))))`` with adapter ``name`` (default: the active
        one), computed in the adapter's dtype."""
        name = name or self.active_adapter
        if name is None:
            return y
        down = cast(nn.Linear, self.adapter_down[name])
        z = down(y.to(down.weight.dtype))
        z = self.adapter_up[name](self.adapter_dropout[name](self.adapter_act[name](z)))
        return y + (self.scaling[name] * z).to(y.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if self.disabled or self.active_adapter is None:
            return out
        if isinstance(out, tuple):
            return (self.adapt(out[0]), *out[1:])
        return self.adapt(out)

    def __getattr__(self, name: str) -> Any:
        # attributes the decoder layer (or transformers utilities) read from the wrapped module, e.g. layer_idx
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)
