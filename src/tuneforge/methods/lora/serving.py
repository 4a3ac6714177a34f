"""LoRA, rsLoRA and DoRA adapters on their own rows of a mixed batch (also QLoRA runs' adapters, which are saved as
LoRA, served on the full-precision base).

Every LoRA adapter is loaded into one peft ``PeftModel`` around the base, under its internal key:

* **LoRA, rsLoRA**, ``lora_kernel="peft"``: the forward passes peft's ``adapter_names`` (one per row, ``"__base__"``
  for rows of other adapters), so each LoRA layer adds ``s * B_r A_r x`` to the rows of adapter ``r`` only.
* **LoRA, rsLoRA**, ``lora_kernel="stacked"``: peft's LoRA layers compute the base alone and one hook per layer adds
  every row's ``s B A x`` with two batched matmuls over the stacked adapters (:meth:`LoraServing._restack`), however
  many adapters the batch mixes.
* **DoRA**: peft refuses ``adapter_names`` for it, so its rows go to peft as ``"__base__"`` and a hook on each LoRA
  layer adds DoRA's term with peft's own DoRA forward on them (:meth:`LoraServing._hook_dora`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tuneforge.methods.serving_hooks import BASE, AdapterLoadError, LoadedAdapter, MethodServing, ServingHost


def _mixed_in_peft(adapter: LoadedAdapter) -> bool:
    """peft mixes it per row through ``adapter_names`` (LoRA, rsLoRA; peft refuses that for DoRA)."""
    return not adapter.config.get("use_dora")


def _on_parameters(peft_model: Any, key: str) -> bool:
    """Adapter ``key`` wraps a bare weight (peft's ``lora.ParamWrapper``: the 3D expert weights of transformers'
    MoE blocks), for which peft refuses ``adapter_names`` and the stacked hooks (linear layers only) would not run."""
    return any(type(m).__name__ == "ParamWrapper" and key in getattr(m, "lora_A", {}) for m in peft_model.modules())


class LoraServing(MethodServing):
    """The LoRA adapters on one served base model, in one peft ``PeftModel`` (None while none is loaded)."""

    def __init__(self, host: ServingHost) -> None:
        super().__init__(host)
        self.peft_model: Any = None
        self.loaded: dict[str, LoadedAdapter] = {}       # by name, in loading order
        self.stacked_hooks: list[Any] = []
        self._slots: torch.Tensor | None = None          # stacked kernel: each row's LoRA slot (0: none)
        self._slot_of: dict[str, int] = {}

    def load(self, adapter: LoadedAdapter) -> None:
        from peft import PeftModel

        if self.peft_model is None:
            self.peft_model = PeftModel.from_pretrained(self.host.base, str(adapter.path), adapter_name=adapter.key)
        else:
            self.peft_model.load_adapter(str(adapter.path), adapter_name=adapter.key)
        self.peft_model.eval()
        if _on_parameters(self.peft_model, adapter.key):
            self.unload(adapter)
            raise AdapterLoadError(f"{adapter.path}: its LoRA targets weights that are not linear layers (MoE "
                                   "experts' stacked weights), which peft cannot mix per row in a batch: merge it "
                                   "(`tuneforge merge`) and serve the merged model with --base")
        if adapter.config.get("use_dora"):
            self._hook_dora(adapter)
        self._restack(extra=adapter)
        self.loaded[adapter.name] = adapter

    def unload(self, adapter: LoadedAdapter) -> None:
        self.loaded.pop(adapter.name, None)
        if self.peft_model is not None:
            self.peft_model.delete_adapter(adapter.key)
            if not self.peft_model.peft_config:     # the last LoRA adapter: give the base its own layers back
                self.peft_model.unload()
                self.peft_model = None
            self._restack()
        adapter.remove_hooks()

    def forward(self, names: list[str], call: Callable[..., Any], **kwargs: Any) -> Any:
        if self.peft_model is None:
            return call(**kwargs)
        keys = [self.loaded[n].key if n in self.loaded and _mixed_in_peft(self.loaded[n]) else BASE for n in names]
        if self.host.lora_kernel == "peft":
            return self.peft_model(adapter_names=keys, **kwargs)
        slots = [self._slot_of.get(k, 0) for k in keys]
        self._slots = torch.tensor(slots, device=self.host.device) if any(slots) else None
        try:
            return call(**kwargs)        # LoRA layers disabled: base output, plus the stacked hooks
        finally:
            self._slots = None

    def _hook_dora(self, adapter: LoadedAdapter) -> None:
        """DoRA rows: peft refuses ``adapter_names`` for DoRA, so its rows go to peft as ``"__base__"`` and a hook
        on each LoRA layer adds DoRA's term with peft's own variant forward (what peft computes with the adapter
        active alone: ``(m / ||W + s B A|| - 1) W x + m / ||W + s B A|| * s B A x``)."""
        names, key, context = {adapter.name}, adapter.key, self.host.context

        def hook(module: Any, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            groups = context.row_groups(names)
            if not groups:
                return None
            x = args[0]
            out = out.clone()
            for _, rows in groups:
                out[rows] = module.lora_variant[key].forward(module, active_adapter=key, x=x[rows].to(out.dtype),
                                                             result=out[rows])
            return out

        for module in self.peft_model.modules():
            variants = getattr(module, "lora_variant", None)
            if isinstance(variants, dict) and key in variants:
                adapter.handles.append(module.register_forward_hook(hook))

    def _restack(self, extra: LoadedAdapter | None = None) -> None:
        """Stacked kernel: per LoRA layer, every mixable adapter's ``A`` ``[slots, r_max, d_in]`` and ``s * B``
        ``[slots, d_out, r_max]`` (slot 0 all zeros: rows without a LoRA adapter; an adapter absent from a
        layer, or of a smaller rank, is zero-padded), and one forward hook per layer that adds
        ``s_i B_i A_i x_i`` to every row ``i`` with two batched matmuls, whatever the number of adapters."""
        for handle in self.stacked_hooks:
            handle.remove()
        self.stacked_hooks, self._slot_of = [], {}
        if self.host.lora_kernel != "stacked" or self.peft_model is None:
            return
        dtype, device = self.host.dtype, self.host.device
        adapters = [a for a in [*self.loaded.values(), *([extra] if extra else [])] if _mixed_in_peft(a)]
        self._slot_of = {a.key: i + 1 for i, a in enumerate(adapters)}
        self.peft_model.base_model.disable_adapter_layers()    # peft computes the base layer; the hooks add LoRA
        for module in self.peft_model.modules():
            lora_a = getattr(module, "lora_A", None)
            if not isinstance(lora_a, nn.ModuleDict) or not isinstance(getattr(module, "base_layer", None), nn.Linear):
                continue
            present = [a for a in adapters if a.key in lora_a]
            if not present:
                continue
            base: nn.Linear = module.base_layer
            weight_a: dict[str, torch.Tensor] = {a.key: module.lora_A[a.key].weight for a in present}
            r_max = max(w.shape[0] for w in weight_a.values())
            A = torch.zeros(len(adapters) + 1, r_max, base.in_features, dtype=dtype, device=device)
            B = torch.zeros(len(adapters) + 1, base.out_features, r_max, dtype=dtype, device=device)
            for a in present:
                slot, wa = self._slot_of[a.key], weight_a[a.key]
                A[slot, :wa.shape[0]] = wa.to(dtype)
                B[slot, :, :wa.shape[0]] = (module.lora_B[a.key].weight * module.scaling[a.key]).to(dtype)
            self.stacked_hooks.append(module.register_forward_hook(self._stacked_hook(A, B)))

    def _stacked_hook(self, A: torch.Tensor, B: torch.Tensor) -> Callable[..., torch.Tensor | None]:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            slots = self._slots
            if slots is None:
                return None
            x = args[0]
            h = torch.bmm(x.to(A.dtype), A[slots].transpose(1, 2))             # [rows, T, r_max]
            return out + torch.bmm(h, B[slots].transpose(1, 2)).to(out.dtype)   # [rows, T, d_out]
        return hook
