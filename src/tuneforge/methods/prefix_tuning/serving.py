"""Prefix-tuning adapters on their own rows of a mixed batch.

The trained key/value prefix is the first ``P`` entries of that row's KV cache (:func:`prefix_cache`, as peft's
``get_prompt`` builds it); the row's real tokens sit at positions ``P, P+1, ...`` as in training. The engine
prefills such a row alone (:meth:`PrefixServing.prefill`); its decode steps then run in the shared batch.
"""

from __future__ import annotations

import torch

from tuneforge.methods.peft_adapters import load_virtual_tokens
from tuneforge.methods.serving_hooks import LoadedAdapter, MethodServing, Prefill


def prefix_cache(adapter: LoadedAdapter) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(key, value)`` of shape ``[1, kv_heads, P, head_dim]``, as peft's ``get_prompt`` builds them
    from the saved ``prompt_embeddings [P, layers * 2 * kv_dim]``."""
    emb = adapter.tensors["prompt_embeddings"]
    layers, heads = int(adapter.config["num_layers"]), int(adapter.config["num_attention_heads"])
    P = emb.shape[0]
    kv = emb.view(1, P, layers * 2, heads, -1).permute(2, 0, 3, 1, 4)   # [2L, 1, heads, P, head_dim]
    return [(kv[2 * i].contiguous(), kv[2 * i + 1].contiguous()) for i in range(layers)]


class PrefixServing(MethodServing):
    def load(self, adapter: LoadedAdapter) -> None:
        cfg = self.host.base.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads   # GPT-NeoX: no GQA key
        load_virtual_tokens(adapter, self.host, cfg.num_hidden_layers * 2 * kv_heads * head_dim, "prefix")

    def prefill(self, adapter: LoadedAdapter, input_ids: torch.Tensor) -> Prefill:
        dev = self.host.device
        P, T = adapter.num_virtual_tokens, input_ids.shape[1]
        past = [(k.to(dev), v.to(dev)) for k, v in prefix_cache(adapter)]
        return past, {"input_ids": input_ids, "position_ids": torch.arange(P, P + T, device=dev)[None]}
