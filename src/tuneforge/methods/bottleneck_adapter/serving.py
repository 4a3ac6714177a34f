"""Bottleneck adapters on their own rows of a mixed batch.

A forward hook on each adapted sub-layer (``self_attn`` / ``mlp``) adds ``s * up(act(down(y)))`` to the rows of
that adapter, with the saved weights (in float32, as :class:`~tuneforge.methods.bottleneck_adapter.layer.
BottleneckAdapterLayer` computes them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tuneforge.methods.bottleneck_adapter.config import BottleneckAdapterConfig
from tuneforge.methods.bottleneck_adapter.layer import ACTIVATIONS
from tuneforge.methods.serving_hooks import AdapterLoadError, LoadedAdapter, MethodServing, hook_rows


def _residual(w: dict[str, torch.Tensor], act: nn.Module, scaling: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``y -> y + s * up(act(down(y)))``."""
    def adapt(y: torch.Tensor) -> torch.Tensor:
        z = act(torch.nn.functional.linear(y.float(), w["adapter_down.weight"], w["adapter_down.bias"]))
        z = torch.nn.functional.linear(z, w["adapter_up.weight"], w["adapter_up.bias"])
        return y + (scaling * z).to(y.dtype)
    return adapt


class BottleneckServing(MethodServing):
    def load(self, adapter: LoadedAdapter) -> None:
        """Group the saved tensors by sub-layer, hook each sub-layer."""
        adapter.tensors = adapter.read_weights(self.host.device)
        cfg = BottleneckAdapterConfig.load(adapter.path)
        act = ACTIVATIONS[cfg.nonlinearity]()
        per_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in adapter.tensors.items():
            for table in ("adapter_down", "adapter_up"):
                marker = f".{table}."
                if marker in key:
                    path, param = key.split(marker)
                    per_module.setdefault(path, {})[f"{table}.{param}"] = t.float()
                    break
            else:
                raise AdapterLoadError(f"{adapter.path}: unexpected bottleneck tensor {key}")
        hidden = self.host.base.config.hidden_size
        for path, weights in per_module.items():
            module = self.host.base.get_submodule(path)
            if weights["adapter_down.weight"].shape[1] != hidden:
                raise AdapterLoadError(f"{adapter.path}: {path} adapter width {weights['adapter_down.weight'].shape[1]}"
                                       f" != the base model's hidden size {hidden}")
            hook_rows(adapter, self.host.context, module, _residual(weights, act, cfg.scaling))
