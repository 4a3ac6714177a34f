"""IA3 adapters on their own rows of a mixed batch.

peft ignores ``adapter_names`` for IA3 (every row would get the active adapter), so IA3 is served by hooks on the
base model: a forward hook on each target linear multiplies row ``i``'s output by ``l_{a(i)}`` (``k_proj``,
``v_proj``: saved ``(d_out, 1)``) or a pre-hook its input (``down_proj``, feed-forward: saved ``(1, d_in)``):
exactly peft's ``y = l * (W x)`` / ``y = W (l * x)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tuneforge.methods.serving_hooks import AdapterLoadError, LoadedAdapter, MethodServing, hook_rows, innermost_linear


def _times(scale: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x * scale


class IA3Serving(MethodServing):
    def load(self, adapter: LoadedAdapter) -> None:
        adapter.tensors = adapter.read_weights(self.host.device)
        for key, vec in adapter.tensors.items():
            if not key.endswith(".ia3_l"):
                raise AdapterLoadError(f"{adapter.path}: unexpected IA3 tensor {key}")
            path = key.removeprefix("base_model.model.").rsplit(".", 1)[0]     # base_model.model.<path>.ia3_l
            module = innermost_linear(self.host.base.get_submodule(path))
            scale = vec.to(self.host.dtype).flatten()
            feedforward = vec.shape[0] == 1          # (1, d_in): scales the input; (d_out, 1): the output
            expected = module.in_features if feedforward else module.out_features
            if scale.numel() != expected:
                raise AdapterLoadError(f"{adapter.path}: {key} has {scale.numel()} values, the base layer "
                                       f"{'input' if feedforward else 'output'} has {expected}")
            hook_rows(adapter, self.host.context, module, _times(scale), where="input" if feedforward else "output")
