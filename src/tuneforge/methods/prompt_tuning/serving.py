"""Prompt-tuning adapters on their own rows of a mixed batch.

The soft prompt's embeddings ``S [P, hidden]`` go in front of that row's prompt at prefill (``[S; E(x)]`` from
position 0, :meth:`PromptServing.prefill`), then live in its KV cache; its decode steps run in the shared batch at
positions ``P + T, ...`` as in training.
"""

from __future__ import annotations

import torch

from tuneforge.methods.peft_adapters import load_virtual_tokens
from tuneforge.methods.serving_hooks import LoadedAdapter, MethodServing, Prefill


class PromptServing(MethodServing):
    def load(self, adapter: LoadedAdapter) -> None:
        load_virtual_tokens(adapter, self.host, self.host.base.config.hidden_size, "soft prompt")

    def prefill(self, adapter: LoadedAdapter, input_ids: torch.Tensor) -> Prefill:
        dev = self.host.device
        P, T = adapter.num_virtual_tokens, input_ids.shape[1]
        soft = adapter.tensors["prompt_embeddings"]                     # [P, hidden]
        embeds = torch.cat([soft[None].to(dev), self.host.embed(input_ids)], dim=1)
        return None, {"inputs_embeds": embeds, "position_ids": torch.arange(P + T, device=dev)[None]}
