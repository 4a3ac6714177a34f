"""What a method gives tuneforge's serving engine so that its adapters run on their own rows of a mixed batch.

A method that can be served sets ``Method.serving`` to a :class:`MethodServing` subclass (its
``methods/<method>/serving.py``). The engine's :class:`~tuneforge.serving.adapters.AdapterSet` makes one instance
per method per served base model, when the first adapter of that method loads, and calls it:

* :meth:`MethodServing.load`: read one adapter's weights and put them onto the base model so that they change only
  the rows of a batch that name that adapter (forward hooks that ask the :class:`RowContext` which rows those
  are); hook handles go into ``adapter.handles``; weights that do not fit the base raise :class:`AdapterLoadError`.
* :meth:`MethodServing.unload`: take them off again (default: remove the hooks).
* :meth:`MethodServing.forward`: run a batch (default: the call it is given, the base model with every hook; LoRA
  calls peft's model with one ``adapter_names`` entry per row instead).
* :meth:`MethodServing.prefill`: for an adapter with virtual tokens (``adapter.num_virtual_tokens = P > 0``: prefix
  and prompt tuning), what its row's KV cache starts with and the model inputs of its prompt.

A method whose record has no ``serving`` is refused, naming the method, when someone tries to serve it. Each path is
tested against the method's own model alone: a mixed batch gives each row the logits its adapter gives it alone
(``tests/test_serve_adapters.py``, ``tests/test_method_serving.py``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE = "__base__"          # the name of rows that use no adapter (peft's ``adapter_names`` value for the base)

# (KV entries the row's cache starts with: per layer (key, value) [1, kv_heads, P, head_dim], or None;
#  the model inputs of the prompt: input_ids or inputs_embeds, and position_ids)
Prefill = tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, dict[str, torch.Tensor]]


class AdapterLoadError(ValueError):
    """An adapter folder that cannot be served on this base model (one line: the folder and what is wrong)."""


def innermost_linear(module: nn.Module) -> nn.Module:
    """The plain layer under peft wrappers (``lora.Linear.base_layer``...): where per-row hooks attach."""
    while hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Module):
        module = module.base_layer
    return module


class RowContext:
    """Which adapter each row of the current forward uses; read by the per-row hooks (thread-local)."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def rows(self) -> list[str] | None:
        return getattr(self._local, "rows", None)

    @contextlib.contextmanager
    def use(self, rows: list[str]) -> Iterator[None]:
        self._local.rows = rows
        try:
            yield
        finally:
            self._local.rows = None

    def row_groups(self, names: set[str]) -> list[tuple[str, list[int]]]:
        """``[(adapter, row indices)]`` for the adapters of ``names`` present in the current batch."""
        rows = self.rows
        if not rows:
            return []
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(rows):
            if name in names:
                groups.setdefault(name, []).append(i)
        return list(groups.items())


@dataclass
class LoadedAdapter:
    """One adapter on the served base model.

    Attributes:
        name: what requests call it.
        path: its folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        method: the name of its method's record.
        key: a name unique among the adapters ever loaded on this base (peft's adapter name for LoRA).
        config: ``adapter_config.json``.
        tensors: what the method keeps of its weights (filled by the method's ``load``).
        num_virtual_tokens: ``P``, the KV-cache positions the adapter takes in front of the prompt (prefix and
            prompt tuning; 0 for the rest); the engine prefills such rows through :meth:`MethodServing.prefill`.
        handles: the hooks the method registered for it (removed on unload, and when loading fails).
    """

    name: str
    path: Path
    method: str
    key: str
    config: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    num_virtual_tokens: int = 0
    handles: list[Any] = field(default_factory=list)

    def read_weights(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """``adapter_model.safetensors`` on ``device``."""
        from safetensors.torch import load_file

        return {k: v.to(device) for k, v in load_file(str(self.path / ADAPTER_WEIGHTS)).items()}

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class ServingHost(Protocol):
    """What a :class:`MethodServing` may use of the engine's adapter set."""

    base: Any                       # the base causal LM (eval mode; its weights are never changed)
    dtype: torch.dtype              # the serving dtype (of the base's floating-point weights)
    device: torch.device
    context: RowContext             # which adapter each row of the running forward uses
    lora_kernel: str                # the server's ``lora_kernel`` setting (``peft`` or ``stacked``)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...


class MethodServing:
    """One method's adapters on one served base model; subclass it in ``methods/<method>/serving.py``.

    Args:
        host: the engine's adapter set (:class:`ServingHost`).
    """

    def __init__(self, host: ServingHost) -> None:
        self.host = host

    def load(self, adapter: LoadedAdapter) -> None:
        """Put ``adapter`` onto the base model, changing only its rows; raise :class:`AdapterLoadError` (one line
        naming ``adapter.path``) when its weights do not fit the base. Any other exception is reported as
        "does not load onto this base model". The hooks in ``adapter.handles`` are removed if it raises."""
        raise NotImplementedError

    def unload(self, adapter: LoadedAdapter) -> None:
        """Take ``adapter`` off the base model."""
        adapter.remove_hooks()

    def forward(self, names: list[str], call: Callable[..., Any], **kwargs: Any) -> Any:
        """The batch forward, row ``i`` using adapter ``names[i]`` (:data:`BASE`: none): ``call(**kwargs)`` (the
        base model, every method's hooks in place). Override only to replace the model call itself, as LoRA does
        (peft's model computes the base inside); per-row changes belong in hooks."""
        return call(**kwargs)

    def prefill(self, adapter: LoadedAdapter, input_ids: torch.Tensor) -> Prefill:
        """For adapters with ``num_virtual_tokens = P > 0``: ``(cache entries, model inputs)`` of a row whose prompt
        is ``input_ids [1, T]`` (its attention mask covers ``P + T`` positions)."""
        raise NotImplementedError(f"method {adapter.method!r} has no virtual tokens to prefill")


def hook_rows(adapter: LoadedAdapter, context: RowContext, module: nn.Module,
              change: Callable[[torch.Tensor], torch.Tensor], where: str = "output") -> None:
    """Change ``module``'s output (``where="output"``; a tuple's first item) or its first input (``"input"``) on the
    rows of ``adapter`` only: ``y[rows] = change(y[rows])``. The handle goes into ``adapter.handles``."""
    names = {adapter.name}

    def input_hook(module: nn.Module, args: tuple) -> tuple | None:
        groups = context.row_groups(names)
        if not groups:
            return None
        x = args[0].clone()
        for _, rows in groups:
            x[rows] = change(x[rows])
        return (x, *args[1:])

    def output_hook(module: nn.Module, args: tuple, out: Any) -> Any:
        groups = context.row_groups(names)
        if not groups:
            return None
        y = (out[0] if isinstance(out, tuple) else out).clone()
        for _, rows in groups:
            y[rows] = change(y[rows])
        return (y, *out[1:]) if isinstance(out, tuple) else y

    if where == "input":
        adapter.handles.append(module.register_forward_pre_hook(input_hook))
    elif where == "output":
        adapter.handles.append(module.register_forward_hook(output_hook))
    else:
        raise ValueError(f"where must be 'input' or 'output' (got {where!r})")
