"""Attention for packed rows that costs what each example costs alone.

With ``attention_mask=None`` and restarting ``position_ids`` transformers builds a dense block-causal
``T x T`` mask for a packed row, and SDPA then computes all ``T^2`` query/key scores, masking most of
them away: a row of ``n`` examples of length ``L`` pays ``n^2 L^2`` instead of ``n L^2``. This
attention function (registered with transformers' ``AttentionInterface`` as ``tuneforge_packed_sdpa``)
splits the row into its examples (the packed batch's ``cu_seq_lens_q`` when the caller passes it, else the
position restarts) and runs causal SDPA per example, so nothing crosses examples
and nothing is wasted (a sliding window shorter than an example, Mistral's or Gemma's,
gets its band mask, and Gemma 2's soft-capped scores are computed by hand). The mask is never built (an
implementation name unknown to the mask registry makes transformers skip it). A ``tuneforge_tree`` keyword (GRPO's
shared-prompt rows, :func:`tuneforge.data.packing.pack_shared_prompts`) gives each example its own boolean mask
and positions in place of the causal mask (a prompt followed by completions that see it and themselves); it
travels with the call's keyword arguments, so gradient checkpointing's recomputation gets it too. Anything that is
not a plain packed training row (an explicit mask, a KV cache, prefix tokens, batch > 1) falls through to
transformers' SDPA.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "tuneforge_packed_sdpa"
# flash-attention's varlen kernel on CUDA over the same rows (kernels/flash_varlen.py registers it)
VARLEN_NAME = "tuneforge_packed_varlen"
PACKED_NAMES = frozenset({NAME, VARLEN_NAME})


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """``query [1, H, T, D]``, ``key/value [1, H_kv, T, D]`` -> ``[1, T, H, D]``, causal within each example."""
    plain_row = (attention_mask is None and position_ids is not None and query.shape[0] == 1
                 and query.shape[2] == key.shape[2])
    if not plain_row:
        if attention_mask is None and key.shape[2] == query.shape[2]:
            kwargs["is_causal"] = True
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    T = query.shape[2]
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None:                        # the packed batch's boundaries, computed once when packing
        lengths = cu_seqlens.diff().tolist()
    else:
        assert position_ids is not None       # part of plain_row
        starts = (position_ids.reshape(-1)[:T] == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0] + starts
        lengths = [e - s for s, e in zip(starts, starts[1:] + [T], strict=True)]
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    p = dropout if module.training else 0.0
    tree = kwargs.get("tuneforge_tree")       # shared-prompt rows (data.packing.pack_shared_prompts): masks per segment
    if tree is not None and len(tree) != len(lengths):
        raise ValueError(f"tuneforge_tree has {len(tree)} segments; the row has {len(lengths)}")
    # split, not slices: a slice's backward writes its gradient into a zero-filled full-length tensor,
    # split's backward concatenates once (-16% attention time for 4 examples)
    with _without_cudnn(query.device):
        outs = [_example_attention(q, k, v, scaling, p, window, softcap, None if tree is None else tree[i])
                for i, (q, k, v) in enumerate(zip(query.split(lengths, 2), key.split(lengths, 2),
                                                  value.split(lengths, 2), strict=True))]
    if len(outs) == 1:
        return outs[0].transpose(1, 2).contiguous(), None
    return torch.cat([o.transpose(1, 2) for o in outs], dim=1), None   # one copy, already [1, T, H, D]


def _without_cudnn(device: torch.device) -> contextlib.AbstractContextManager:
    """On CUDA, SDPA without its cuDNN backend: cuDNN builds an execution plan for every new sequence length (on an
    H200 with torch 2.11, 4 ms of CPU per forward call and 3 ms per backward, measured with
    ``benchmarks/throughput/profile_train.py``), and every example of a packed row has its own length. Flash (then
    memory-efficient, then math) attention have no per-shape set-up. Elsewhere: nothing changes."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(_NO_CUDNN)


_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _example_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None, dropout: float,
                       window: int | None, softcap: float | None,
                       tree: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention of one example ``q [1, H, n, D]``, ``k/v [1, H_kv, n, D]`` -> ``[1, H, n, D]``.

    ``window`` (Mistral, Gemma 2/3 sliding layers): query ``i`` sees keys ``i - window < j <= i``, as transformers'
    sliding-window mask. ``softcap`` (Gemma 2): scores ``softcap * tanh(q.k * scale / softcap)`` before the
    softmax (in fp32, as transformers' eager attention), which SDPA cannot do, so computed by hand. ``tree``: a
    shared-prompt segment's ``(allowed [n, n], positions [n])`` in place of the causal mask (the window then
    counts positions, not row offsets).
    """
    n, gqa = q.shape[2], q.shape[1] != k.shape[1]
    if tree is None and softcap is None and (window is None or window >= n):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=dropout,
                                              enable_gqa=gqa)
    if tree is not None:
        allowed, i = tree
        if window is not None and window < n:
            allowed = allowed & (i[None, :] > i[:, None] - window)
    else:
        i = torch.arange(n, device=q.device)
        allowed = i[None, :] <= i[:, None]
        if window is not None:
            allowed &= i[None, :] > i[:, None] - window
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling, dropout_p=dropout,
                                              enable_gqa=gqa)
    if gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.tanh(q @ k.transpose(-1, -2) * scale / softcap) * softcap
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
    return F.dropout(probs, p=dropout, training=dropout > 0) @ v


AttentionInterface.register(NAME, packed_sdpa_attention)


def base_pretrained(model: torch.nn.Module) -> PreTrainedModel | None:
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def uses_packed_attention(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the transformers model inside a wrapper) runs :func:`packed_sdpa_attention` (or
    its flash-attention varlen form)."""
    base = base_pretrained(model)
    return base is not None and base.config._attn_implementation in PACKED_NAMES


def set_attention(model: torch.nn.Module, implementation: str) -> str:
    """Switch the attention of ``model`` (or the transformers model inside a peft wrapper); return the old one."""
    base = base_pretrained(model)
    if base is None:
        return ""
    previous = base.config._attn_implementation
    for m in model.modules():
        config = getattr(m, "config", None)
        if isinstance(m, PreTrainedModel) and config is not None:
            config._attn_implementation = implementation
    return previous
