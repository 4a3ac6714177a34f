"""One bottleneck adapter wrapped around one sub-layer (attention or MLP) of a decoder layer.

For a sub-layer ``f`` with output ``y = f(x)`` of width ``d``, the wrapped layer returns

    y + s * W_up · act(W_down · y + b_down) + s * b_up

with ``W_down: (b, d)``, ``b_down: (b,)``, ``W_up: (d, b)``, ``b_up: (d,)`` and scaling ``s``. The decoder
layer then adds its residual as before, so per decoder layer: ``h = x + adapter(attn(norm(x)))``.
``W_down`` uses nn.Linear's default (Kaiming-uniform) init; ``W_up`` and ``b_up`` start at zero, so the
wrapped layer returns exactly ``y`` before the first step and training starts at the base model.
Trainable parameters per adapter: ``2·d·b + b + d``. There is no merge into the base weights: the
nonlinearity between the two projections makes the adapter not a linear map.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapterLayer(nn.Module):
    """``base_layer`` followed by a residual bottleneck on its output.

    Args:
        base_layer: the wrapped sub-layer; its output is a tensor ``(..., d)`` or a tuple whose first item is.
        hidden_size: ``d``.
        bottleneck: ``b``.
        nonlinearity: key of :data:`ACTIVATIONS`.
        dropout: dropout probability on the bottleneck activations.
        scaling: ``s``.
    """

    def __init__(self, base_layer: nn.Module, hidden_size: int, bottleneck: int, nonlinearity: str = "gelu",
                 dropout: float = 0.0, scaling: float = 1.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        weight = next(base_layer.parameters(), None)
        factory = {"device": weight.device} if weight is not None else {}
        self.adapter_down = nn.Linear(hidden_size, bottleneck, bias=True, **factory)
        self.adapter_act = ACTIVATIONS[nonlinearity]()
        self.adapter_dropout = nn.Dropout(dropout)
        self.adapter_up = nn.Linear(bottleneck, hidden_size, bias=True, **factory)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.scaling = scaling
        self.disabled = False

    def adapt(self, y: torch.Tensor) -> torch.Tensor:
        """``y (..., d) -> y + s * up(dropout(act(down(y))))``, computed in the adapter's dtype."""
        z = self.adapter_down(y.to(self.adapter_down.weight.dtype))
        z = self.adapter_up(self.adapter_dropout(self.adapter_act(z)))
        return y + (self.scaling * z).to(y.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if self.disabled:
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
