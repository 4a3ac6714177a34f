"""Many adapters on one base model, each row of a batch computed with its own adapter.

:class:`AdapterSet` holds one base model and the adapters loaded onto it, and runs one forward over a batch
whose rows may each name a different adapter (or none: the base model). How each method gets per-row:

* **LoRA, rsLoRA** (``peft_type: LORA``, also QLoRA runs' adapters, on the full-precision base): loaded into
  one peft ``PeftModel`` under an internal name; the forward passes peft's ``adapter_names`` (one per row,
  ``"__base__"`` for rows of other adapters), so each LoRA layer adds ``s * B_r A_r x`` to the rows of adapter
  ``r`` only. With ``lora_kernel="stacked"`` peft's LoRA layers compute the base alone and one hook per layer
  adds every row's ``s B A x`` with two batched matmuls over the stacked adapters (:meth:`AdapterSet._restack`),
  however many adapters the batch mixes.
* **DoRA**: loaded into the same ``PeftModel``, but peft refuses ``adapter_names`` for it, so its rows go to
  peft as ``"__base__"`` and a hook on each LoRA layer adds DoRA's term with peft's own DoRA forward on them.
* **IA3**: peft ignores ``adapter_names`` for IA3 (every row would get the active adapter), so IA3 runs here:
  a forward hook on each target linear multiplies row ``i``'s output by ``l_{a(i)}`` (``k_proj``, ``v_proj``)
  or a pre-hook its input (``down_proj``, feed-forward): exactly peft's ``y = l * (W x)`` / ``y = W (l * x)``.
* **Prefix tuning**: the trained key/value prefix is the first ``P`` entries of that row's KV cache
  (:meth:`LoadedAdapter.prefix_cache`); its real tokens sit at positions ``P, P+1, ...`` as in training.
* **Prompt tuning**: the soft prompt's embeddings go in front of that row's prompt at prefill
  (:meth:`LoadedAdapter.soft_prompt`), then live in its KV cache; positions as for prefix tuning.
* **Bottleneck adapters** (ours): a forward hook on each adapted sub-layer (``self_attn`` / ``mlp``) adds
  ``s * up(act(down(y)))`` to the rows of that adapter.

A full fine-tune is not an adapter: serve its folder as the base model instead. Each path is tested against
the method loaded alone (``tests/test_serve_adapters.py``): a mixed batch gives each row the logits its own
adapter gives it alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

log = logging.getLogger(__name__)

BASE = "__base__"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LORA_KERNELS = ("peft", "stacked")
PEFT_KINDS = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}


class AdapterLoadError(ValueError):
    """An adapter folder that cannot be served on this base model (one line: the folder and what is wrong)."""


class NoAdapterSlot(AdapterLoadError):
    """Every adapter slot holds a pinned adapter: the one asked for can never be loaded."""


def adapter_kind(folder: str | Path) -> str:
    """``lora`` / ``ia3`` / ``prefix`` / ``prompt`` / ``adapter`` (bottleneck) for a saved adapter folder.

    Raises :class:`AdapterLoadError` for anything else: a missing folder, a full model, an unknown type.
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
        data = json.loads(cfg.read_text())
    except AdapterLoadError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterLoadError(f"{folder / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    except (OSError, ValueError) as e:        # a name too long, a NUL byte, no permission, ...
        raise AdapterLoadError(f"{str(folder)[:300]}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{cfg}: expected a JSON object")
    from tuneforge.methods.bottleneck_adapter.config import ADAPTER_TYPE

    if data.get("adapter_type") == ADAPTER_TYPE:
        return "adapter"
    kind = PEFT_KINDS.get(str(data.get("peft_type")))
    if kind is None:
        raise AdapterLoadError(f"{cfg}: peft_type {data.get('peft_type')!r} cannot be served "
                               f"(served: {', '.join(PEFT_KINDS)} and tuneforge bottleneck adapters)")
    return kind


def check_base(folder: str | Path, base_path: str | Path | None) -> None:
    """Refuse a package (a folder with ``tuneforge.json``) trained on another base model: one line naming both
    sha256 (:func:`tuneforge.export.package.verify_base_model`). Other folders have nothing to check."""
    if base_path is None or not (Path(folder) / "tuneforge.json").is_file():
        return
    from tuneforge.export.package import verify_base_model

    try:
        verify_base_model(folder, base_path)
    except (ValueError, OSError) as e:
        raise AdapterLoadError(str(e)) from None


def innermost_linear(module: nn.Module) -> nn.Module:
    """The plain layer under peft wrappers (``lora.Linear.base_layer``...): where per-row hooks attach."""
    while hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Module):
        module = module.base_layer
    return module


@dataclass
class LoadedAdapter:
    """One adapter on the base model: its name, folder, method and what the forward needs of it."""

    name: str
    path: Path
    kind: str
    key: str                                   # internal name (peft's adapter name for LoRA)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    num_virtual_tokens: int = 0

    @property
    def mixed_in_peft(self) -> bool:
        """peft mixes it per row through ``adapter_names`` (LoRA, rsLoRA; peft refuses that for DoRA)."""
        return self.kind == "lora" and not self.config.get("use_dora")

    def prefix_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prefix tuning: per layer ``(key, value)`` of shape ``[1, kv_heads, P, head_dim]``, as peft's
        ``get_prompt`` builds them from the saved ``prompt_embeddings [P, layers * 2 * kv_dim]``."""
        emb = self.tensors["prompt_embeddings"]
        layers, heads = int(self.config["num_layers"]), int(self.config["num_attention_heads"])
        P = emb.shape[0]
        kv = emb.view(1, P, layers * 2, heads, -1).permute(2, 0, 3, 1, 4)   # [2L, 1, heads, P, head_dim]
        return [(kv[2 * i].contiguous(), kv[2 * i + 1].contiguous()) for i in range(layers)]

    def soft_prompt(self) -> torch.Tensor:
        """Prompt tuning: the soft prompt ``[P, hidden]``."""
        return self.tensors["prompt_embeddings"]


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


class AdapterSet:
    """One base model and the adapters loaded onto it; :meth:`forward` runs a batch of rows with mixed adapters.

    Args:
        base: the base causal LM (eval mode; its weights are never changed).
        base_path: its folder, for checking that a packaged adapter was trained on it.
    """

    def __init__(self, base: nn.Module, base_path: str | Path | None = None, lora_kernel: str = "peft") -> None:
        if lora_kernel not in LORA_KERNELS:
            raise ValueError(f"lora_kernel must be one of {', '.join(LORA_KERNELS)} (got {lora_kernel!r})")
        self.base: Any = base.eval()
        self.base_path = base_path
        self.lora_kernel = lora_kernel
        self._stacked_hooks: list[Any] = []
        self._slots: torch.Tensor | None = None        # stacked kernel: each row's LoRA slot (0: none)
        self._slot_of: dict[str, int] = {}
        self.peft_model: Any = None
        self.adapters: dict[str, LoadedAdapter] = {}
        self.context = RowContext()
        self._hooks: dict[str, list[Any]] = {}
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
        kind = adapter_kind(folder)
        self._check_base(folder)
        self._counter += 1
        key = f"tf{self._counter}"
        try:
            config = json.loads((folder / ADAPTER_CONFIG).read_text())
            adapter = LoadedAdapter(name=name, path=folder, kind=kind, key=key, config=config)
            if kind == "lora":
                self._load_lora(adapter)
            else:
                adapter.tensors = {k: v.to(self.device) for k, v in load_file(str(folder / ADAPTER_WEIGHTS)).items()}
                getattr(self, f"_load_{kind}")(adapter)
        except AdapterLoadError:
            raise
        except Exception as e:   # peft/safetensors errors: shape mismatches, missing modules, bad files
            self._remove_hooks(key)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AdapterLoadError(f"{folder} does not load onto this base model: {first[:300]}") from None
        self.adapters[name] = adapter
        log.info("loaded adapter %s (%s) from %s", name, kind, folder)
        return adapter

    def unload(self, name: str) -> None:
        adapter = self.adapters.pop(name)
        if adapter.kind == "lora" and self.peft_model is not None:
            self.peft_model.delete_adapter(adapter.key)
            if not self.peft_model.peft_config:     # the last LoRA adapter: give the base its own layers back
                self.peft_model.unload()
                self.peft_model = None
            self._restack()
        self._remove_hooks(adapter.key)

    def _check_base(self, folder: Path) -> None:
        check_base(folder, self.base_path)

    def _load_lora(self, adapter: LoadedAdapter) -> None:
        from peft import PeftModel

        if self.peft_model is None:
            self.peft_model = PeftModel.from_pretrained(self.base, str(adapter.path), adapter_name=adapter.key)
        else:
            self.peft_model.load_adapter(str(adapter.path), adapter_name=adapter.key)
        self.peft_model.eval()
        if adapter.config.get("use_dora"):
            self._hook_dora(adapter)
        self._restack(extra=adapter)

    def _hook_dora(self, adapter: LoadedAdapter) -> None:
        """DoRA rows: peft refuses ``adapter_names`` for DoRA, so its rows go to peft as ``"__base__"`` and a hook
        on each LoRA layer adds DoRA's term with peft's own variant forward (what peft computes with the adapter
        active alone: ``(m / ||W + s B A|| - 1) W x + m / ||W + s B A|| * s B A x``)."""
        names = {adapter.name}
        key = adapter.key
        hooks = []
        for module in self.peft_model.modules():
            variants = getattr(module, "lora_variant", None)
            if isinstance(variants, dict) and key in variants:
                hooks.append(module.register_forward_hook(self._dora_hook(names, key)))
        self._hooks[key] = hooks

    def _dora_hook(self, names: set[str], key: str):
        def hook(module: Any, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            groups = self.context.row_groups(names)
            if not groups:
                return None
            x = args[0]
            out = out.clone()
            for _, rows in groups:
                out[rows] = module.lora_variant[key].forward(module, active_adapter=key, x=x[rows].to(out.dtype),
                                                             result=out[rows])
            return out
        return hook

    def _restack(self, extra: LoadedAdapter | None = None) -> None:
        """Stacked kernel: per LoRA layer, every mixable adapter's ``A`` ``[slots, r_max, d_in]`` and ``s * B``
        ``[slots, d_out, r_max]`` (slot 0 all zeros: rows without a LoRA adapter; an adapter absent from a
        layer, or of a smaller rank, is zero-padded), and one forward hook per layer that adds
        ``s_i B_i A_i x_i`` to every row ``i`` with two batched matmuls, whatever the number of adapters."""
        for handle in self._stacked_hooks:
            handle.remove()
        self._stacked_hooks, self._slot_of = [], {}
        if self.lora_kernel != "stacked" or self.peft_model is None:
            return
        adapters = [a for a in [*self.adapters.values(), *([extra] if extra else [])] if a.mixed_in_peft]
        self._slot_of = {a.key: i + 1 for i, a in enumerate(adapters)}
        self.peft_model.base_model.disable_adapter_layers()    # peft computes the base layer; the hooks add LoRA
        for module in self.peft_model.modules():
            lora_a = getattr(module, "lora_A", None)
            if not isinstance(lora_a, nn.ModuleDict) or not isinstance(getattr(module, "base_layer", None), nn.Linear):
                continue
            present = [a for a in adapters if a.key in lora_a]
            if not present:
                continue
            base = module.base_layer
            r_max = max(lora_a[a.key].weight.shape[0] for a in present)
            A = torch.zeros(len(adapters) + 1, r_max, base.in_features, dtype=self.dtype, device=self.device)
            B = torch.zeros(len(adapters) + 1, base.out_features, r_max, dtype=self.dtype, device=self.device)
            for a in present:
                slot, wa = self._slot_of[a.key], lora_a[a.key].weight
                A[slot, :wa.shape[0]] = wa.to(self.dtype)
                B[slot, :, :wa.shape[0]] = (module.lora_B[a.key].weight * module.scaling[a.key]).to(self.dtype)
            self._stacked_hooks.append(module.register_forward_hook(self._stacked_hook(A, B)))

    def _stacked_hook(self, A: torch.Tensor, B: torch.Tensor):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            slots = self._slots
            if slots is None:
                return None
            x = args[0]
            h = torch.bmm(x.to(A.dtype), A[slots].transpose(1, 2))             # [rows, T, r_max]
            return out + torch.bmm(h, B[slots].transpose(1, 2)).to(out.dtype)   # [rows, T, d_out]
        return hook

    def _module(self, saved_key: str) -> nn.Module:
        """The base model's module a saved peft key points at (``base_model.model.<path>.<param>``)."""
        path = saved_key.removeprefix("base_model.model.").rsplit(".", 1)[0]
        return innermost_linear(self.base.get_submodule(path))

    def _load_ia3(self, adapter: LoadedAdapter) -> None:
        names = {adapter.name}
        hooks = []
        for key, vec in adapter.tensors.items():
            if not key.endswith(".ia3_l"):
                raise AdapterLoadError(f"{adapter.path}: unexpected IA3 tensor {key}")
            module = self._module(key)
            scale = vec.to(self.dtype).flatten()
            feedforward = vec.shape[0] == 1          # (1, d_in): scales the input; (d_out, 1): the output
            expected = module.in_features if feedforward else module.out_features
            if scale.numel() != expected:
                raise AdapterLoadError(f"{adapter.path}: {key} has {scale.numel()} values, the base layer "
                                       f"{'input' if feedforward else 'output'} has {expected}")
            if feedforward:
                hooks.append(module.register_forward_pre_hook(self._scale_input_hook(names, scale)))
            else:
                hooks.append(module.register_forward_hook(self._scale_output_hook(names, scale)))
        self._hooks[adapter.key] = hooks

    def _scale_input_hook(self, names: set[str], scale: torch.Tensor):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            groups = self.context.row_groups(names)
            if not groups:
                return None
            x = args[0].clone()
            for _, rows in groups:
                x[rows] = x[rows] * scale
            return (x, *args[1:])
        return hook

    def _scale_output_hook(self, names: set[str], scale: torch.Tensor):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            groups = self.context.row_groups(names)
            if not groups:
                return None
            out = out.clone()
            for _, rows in groups:
                out[rows] = out[rows] * scale
            return out
        return hook

    def _load_prefix(self, adapter: LoadedAdapter) -> None:
        cfg = self.base.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._load_virtual_tokens(adapter, cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim, "prefix")

    def _load_prompt(self, adapter: LoadedAdapter) -> None:
        self._load_virtual_tokens(adapter, self.base.config.hidden_size, "soft prompt")

    def _load_virtual_tokens(self, adapter: LoadedAdapter, width: int, what: str) -> None:
        """Prefix and prompt tuning: ``prompt_embeddings`` of shape (P, width), in the serving dtype."""
        emb = adapter.tensors.get("prompt_embeddings")
        if emb is None or emb.ndim != 2 or emb.shape[1] != width:
            got = None if emb is None else tuple(emb.shape)
            raise AdapterLoadError(f"{adapter.path}: {what} of shape {got}, this base model needs (P, {width})")
        adapter.tensors["prompt_embeddings"] = emb.to(self.dtype)
        adapter.num_virtual_tokens = emb.shape[0]

    def _load_adapter(self, adapter: LoadedAdapter) -> None:
        """Bottleneck adapter: group the saved tensors by sub-layer, hook each sub-layer."""
        from tuneforge.methods.bottleneck_adapter.config import BottleneckAdapterConfig
        from tuneforge.methods.bottleneck_adapter.layer import ACTIVATIONS

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
        hooks = []
        names = {adapter.name}
        hidden = self.base.config.hidden_size
        for path, weights in per_module.items():
            module = self.base.get_submodule(path)
            if weights["adapter_down.weight"].shape[1] != hidden:
                raise AdapterLoadError(f"{adapter.path}: {path} adapter width {weights['adapter_down.weight'].shape[1]}"
                                       f" != the base model's hidden size {hidden}")
            hooks.append(module.register_forward_hook(self._bottleneck_hook(names, weights, act, cfg.scaling)))
        self._hooks[adapter.key] = hooks

    def _bottleneck_hook(self, names: set[str], w: dict[str, torch.Tensor], act: nn.Module, scaling: float):
        def adapt(y: torch.Tensor) -> torch.Tensor:
            z = act(torch.nn.functional.linear(y.float(), w["adapter_down.weight"], w["adapter_down.bias"]))
            z = torch.nn.functional.linear(z, w["adapter_up.weight"], w["adapter_up.bias"])
            return y + (scaling * z).to(y.dtype)

        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            groups = self.context.row_groups(names)
            if not groups:
                return None
            y = (out[0] if isinstance(out, tuple) else out).clone()
            for _, rows in groups:
                y[rows] = adapt(y[rows])
            return (y, *out[1:]) if isinstance(out, tuple) else y
        return hook

    def _remove_hooks(self, key: str) -> None:
        for handle in self._hooks.pop(key, []):
            handle.remove()

    # ------------------------------------------------------------------------------------------ forward

    @torch.no_grad()
    def forward(self, rows: list[str | None], **kwargs: Any) -> Any:
        """The causal LM's forward over a batch whose row ``i`` uses adapter ``rows[i]`` (None: the base).

        ``kwargs`` go to the model (``input_ids`` or ``inputs_embeds``, ``attention_mask``, ``position_ids``,
        the KV cache, ``use_cache``, ``logits_to_keep``).
        """
        names = [r if r is not None else BASE for r in rows]
        with self.context.use(names):
            if self.peft_model is None:
                return self.base(**kwargs)
            keys = [self.adapters[n].key if n in self.adapters and self.adapters[n].mixed_in_peft else BASE
                    for n in names]
            if self.lora_kernel == "peft":
                return self.peft_model(adapter_names=keys, **kwargs)
            slots = [self._slot_of.get(k, 0) for k in keys]
            self._slots = torch.tensor(slots, device=self.device) if any(slots) else None
            try:
                return self.base(**kwargs)        # LoRA layers disabled: base output, plus the stacked hooks
            finally:
                self._slots = None

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

            try:
                tokenizer = AutoTokenizer.from_pretrained(folder)
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
