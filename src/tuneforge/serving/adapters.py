"""Many adapters on one base model, each row of a batch computed with its own adapter.

:class:`AdapterSet` holds one base model and the adapters loaded onto it, and runs one forward over a batch
whose rows may each name a different adapter (or none: the base model). It knows no method: how an adapter of a
method changes only its own rows is the method's serving hook (``Method.serving``, a
:class:`~tuneforge.methods.serving_hooks.MethodServing` in ``methods/<method>/serving.py``: LoRA through peft's
``adapter_names`` or a stacked kernel, DoRA, IA3 and bottleneck adapters through per-row hooks, prefix and prompt
tuning through their rows' KV cache). A method without serving hooks is refused with one line naming it.

:class:`AdapterRegistry` holds the adapters a server knows by name, at most ``max_loaded`` of them loaded (LRU,
pinning). A full fine-tune is not an adapter: serve its folder as the base model instead. Each method is tested
against itself loaded alone (``tests/test_serve_adapters.py``, ``tests/test_method_serving.py``): a mixed batch
gives each row the logits its own adapter gives it alone.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuneforge.methods.registry import Method, method_for_saved_type, methods
from tuneforge.methods.reward_head import is_reward_model, not_generative
from tuneforge.methods.serving_hooks import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE,
    AdapterLoadError,
    LoadedAdapter,
    MethodServing,
    Prefill,
    RowContext,
)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "BASE", "LORA_KERNELS", "AdapterEntry", "AdapterLoadError",
           "AdapterRegistry", "AdapterSet", "LoadedAdapter", "NoAdapterSlot", "RowContext", "adapter_kind",
           "check_base", "served_method"]

log = logging.getLogger(__name__)

LORA_KERNELS = ("peft", "stacked")


class NoAdapterSlot(AdapterLoadError):
    """Every adapter slot holds a pinned adapter: the one asked for can never be loaded."""


def served_method(folder: str | Path) -> Method:
    """The record of the method whose adapter ``folder`` holds, if the server can serve it.

    Raises :class:`AdapterLoadError` (one line) for anything else: a missing folder, a full model, a type no method
    saves, a method without serving hooks.
    """
    folder = Path(folder)
    try:
        if not folder.is_dir():
            raise AdapterLoadError(f"{folder}: no such folder")
        cfg = folder / ADAPTER_CONFIG
        if not cfg.is_file():
            if (folder / "config.json").is_file():
                raise AdapterLoadError(f"{folder} holds a full model, not an adapter: serve it with --base {folder}")
            raise AdapterLoadError(f"{folder} is not an adapter: it has no {ADAPTER_CONFIG}")
        if not (folder / ADAPTER_WEIGHTS).is_file():
            raise AdapterLoadError(f"{folder} is not an adapter: it has no {ADAPTER_WEIGHTS}")
        if is_reward_model(folder):
            raise AdapterLoadError(not_generative(folder, "serving it as a chat adapter"))
        data = json.loads(cfg.read_text())
    except AdapterLoadError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterLoadError(f"{folder / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    except (OSError, ValueError) as e:        # a name too long, a NUL byte, no permission, ...
        raise AdapterLoadError(f"{str(folder)[:300]}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{cfg}: expected a JSON object")
    field = "adapter_type" if data.get("adapter_type") else "peft_type"
    method = method_for_saved_type(str(data.get(field)))
    if method is None:
        served = ", ".join(m.name for m in methods() if m.serving is not None)
        raise AdapterLoadError(f"{cfg}: {field} {data.get(field)!r} cannot be served (served methods: {served})")
    if method.serving is None:
        raise AdapterLoadError(f"{folder}: method {method.name!r} cannot be served: its record has no serving hooks "
                               "(Method.serving)")
    return method


def adapter_kind(folder: str | Path) -> str:
    """The name of the method whose adapter ``folder`` holds (``lora``, ``ia3``, ...); see :func:`served_method`."""
    return served_method(folder).name


def check_base(folder: str | Path, base_path: str | Path | None) -> None:
    """Refuse a package (a folder with ``tuneforge.json``) trained on another base model: one line naming both
    sha256 (:func:`tuneforge.runs.verify_base_model`). Other folders have nothing to check."""
    from tuneforge.runs import RunDir, verify_base_model

    if base_path is None or not RunDir(folder).is_package:
        return

    try:
        verify_base_model(folder, base_path)
    except (ValueError, OSError) as e:
        raise AdapterLoadError(str(e)) from None


class AdapterSet:
    """One base model and the adapters loaded onto it; :meth:`forward` runs a batch of rows with mixed adapters.

    Args:
        base: the base causal LM (eval mode; its weights are never changed).
        base_path: its folder, for checking that a packaged adapter was trained on it.
        lora_kernel: how LoRA rows are computed (``peft``: peft's ``adapter_names``; ``stacked``: two batched
            matmuls per layer), read by LoRA's serving hook.

    Attributes:
        adapters: the loaded adapters by name.
        serving: each method's serving state on this base (:class:`MethodServing`), by method name, made when the
            first adapter of the method loads.
    """

    def __init__(self, base: nn.Module, base_path: str | Path | None = None, lora_kernel: str = "peft") -> None:
        if lora_kernel not in LORA_KERNELS:
            raise ValueError(f"lora_kernel must be one of {', '.join(LORA_KERNELS)} (got {lora_kernel!r})")
        self.base: Any = base.eval()
        self.base_path = base_path
        self.lora_kernel = lora_kernel
        self.adapters: dict[str, LoadedAdapter] = {}
        self.serving: dict[str, MethodServing] = {}
        self.context = RowContext()
        self._counter = 0
        self.dtype = next(p for p in base.parameters() if p.dtype.is_floating_point).dtype
        self.device = next(base.parameters()).device

    # ------------------------------------------------------------------------------------------ loading

    def load(self, name: str, folder: str | Path) -> LoadedAdapter:
        """Load the adapter in ``folder`` as ``name``. On any error nothing changes and
        :class:`AdapterLoadError` says, in one line, which folder and why."""
        folder = Path(folder)
        if name in self.adapters:
            raise AdapterLoadError(f"adapter {name!r} is already loaded; unload it first")
        method = served_method(folder)
        self._check_base(folder)
        self._counter += 1
        adapter = LoadedAdapter(name=name, path=folder, method=method.name, key=f"tf{self._counter}")
        try:
            adapter.config = json.loads((folder / ADAPTER_CONFIG).read_text())
            self._serving(method).load(adapter)
        except Exception as e:   # peft/safetensors errors: shape mismatches, missing modules, bad files
            adapter.remove_hooks()
            if isinstance(e, AdapterLoadError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AdapterLoadError(f"{folder} does not load onto this base model: {first[:300]}") from None
        self.adapters[name] = adapter
        log.info("loaded adapter %s (%s) from %s", name, method.name, folder)
        return adapter

    def unload(self, name: str) -> None:
        adapter = self.adapters.pop(name)
        self.serving[adapter.method].unload(adapter)

    def _serving(self, method: Method) -> MethodServing:
        if method.name not in self.serving:
            assert method.serving is not None          # served_method refused it otherwise
            self.serving[method.name] = method.serving(self)
        return self.serving[method.name]

    def _check_base(self, folder: Path) -> None:
        check_base(folder, self.base_path)

    # ------------------------------------------------------------------------------------------ forward

    @torch.no_grad()
    def forward(self, rows: list[str | None], **kwargs: Any) -> Any:
        """The causal LM's forward over a batch whose row ``i`` uses adapter ``rows[i]`` (None: the base).

        ``kwargs`` go to the model (``input_ids`` or ``inputs_embeds``, ``attention_mask``, ``position_ids``,
        the KV cache, ``use_cache``, ``logits_to_keep``). Each method's serving may wrap the call (LoRA's peft model).
        """
        names = [r if r is not None else BASE for r in rows]
        with self.context.use(names):
            call = self.base
            for serving in self.serving.values():
                call = functools.partial(serving.forward, names, call)
            return call(**kwargs)

    def prefill_inputs(self, name: str, input_ids: torch.Tensor) -> Prefill:
        """For adapter ``name`` with virtual tokens (``num_virtual_tokens = P > 0``): the KV entries its row's
        cache starts with (or None) and the model inputs of its prompt ``input_ids [1, T]``
        (:meth:`MethodServing.prefill`)."""
        adapter = self.adapters[name]
        return self.serving[adapter.method].prefill(adapter, input_ids)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.get_input_embeddings()(input_ids)


@dataclass
class AdapterEntry:
    """An adapter the server knows by name: where it lives, its tokenizer (None: the base's), whether pinned."""

    name: str
    path: Path
    kind: str
    tokenizer: Any = None
    pinned: bool = False


class AdapterRegistry:
    """Named adapters, at most ``max_loaded`` of them loaded at once; the least recently used unpinned one that
    no running request uses is unloaded to make room (it loads again, from its folder, when next asked for).

    :meth:`register` checks a folder (method, tokenizer) without loading weights and may run on any thread;
    :meth:`acquire` / :meth:`release` / :meth:`unload` change the model and run on the engine's thread only.
    """

    def __init__(self, adapter_set: AdapterSet, max_loaded: int = 8) -> None:
        if max_loaded < 1:
            raise ValueError("max_loaded_adapters must be at least 1")
        self.set = adapter_set
        self.max_loaded = max_loaded
        self.entries: dict[str, AdapterEntry] = {}
        self.in_use: dict[str, int] = {}
        self._lru: list[str] = []                      # loaded adapters, least recently used first
        self._lock = threading.Lock()
        self.evictions = 0

    def register(self, name: str, folder: str | Path, pinned: bool = False) -> AdapterEntry:
        """Know ``folder`` as ``name`` (its method and tokenizer are read now; weights load on first use)."""
        folder = Path(folder)
        kind = adapter_kind(folder)
        self.set._check_base(folder)
        tokenizer = None
        if (folder / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            from tuneforge.errors import ConfigError
            from tuneforge.models.remote_code import check_remote_code
            from tuneforge.runs import run_trusts_remote_code

            trust = run_trusts_remote_code(folder)          # the adapter's run's own choice (run.json)
            try:
                check_remote_code(str(folder), folder, trust)
            except ConfigError as e:
                raise AdapterLoadError(str(e)) from None
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
            except Exception as e:
                reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                raise AdapterLoadError(f"{folder}: its tokenizer does not load ({reason})") from None
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        entry = AdapterEntry(name, folder, kind, tokenizer, pinned)
        with self._lock:
            if name in self.entries:
                raise AdapterLoadError(f"adapter {name!r} is already registered; unload it first")
            self.entries[name] = entry
        return entry

    def forget(self, name: str) -> None:
        with self._lock:
            self.entries.pop(name, None)

    def get(self, name: str) -> AdapterEntry | None:
        with self._lock:
            return self.entries.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self.entries)

    @property
    def loaded(self) -> list[str]:
        return list(self._lru)

    def acquire(self, name: str) -> bool:
        """Make ``name`` loaded and count one more user; False when every slot holds a pinned or busy adapter
        (the caller waits). Raises :class:`AdapterLoadError` when the folder no longer loads."""
        entry = self.get(name)
        if entry is None:
            raise AdapterLoadError(f"adapter {name!r} is not registered")
        if name not in self.set.adapters:
            while len(self._lru) >= self.max_loaded:
                victim = next((n for n in self._lru if self.in_use.get(n, 0) == 0
                               and not (self.entries.get(n) and self.entries[n].pinned)), None)
                if victim is None:
                    if all(self.entries.get(n) is not None and self.entries[n].pinned for n in self._lru):
                        raise NoAdapterSlot(f"adapter {name!r} cannot be loaded: all {self.max_loaded} adapter "
                                            "slots hold pinned adapters (unload one, or raise --max-loaded-adapters)")
                    return False
                self._unload(victim)
                self.evictions += 1
            self.set.load(name, entry.path)
        else:
            self._lru.remove(name)
        self._lru.append(name)
        self.in_use[name] = self.in_use.get(name, 0) + 1
        return True

    def release(self, name: str) -> None:
        self.in_use[name] = max(0, self.in_use.get(name, 0) - 1)

    def unload(self, name: str) -> None:
        """Unload ``name`` now (the caller makes sure no running request uses it)."""
        if name in self.set.adapters:
            self._unload(name)

    def _unload(self, name: str) -> None:
        self.set.unload(name)
        self._lru.remove(name)
        self.in_use.pop(name, None)
