"""Packed attention through flash-attention 2's varlen kernel (CUDA), else :func:`packed_sdpa_attention`.

Registered with transformers' ``AttentionInterface`` as ``tuneforge_packed_varlen`` (no "flash" in the name:
transformers gives any implementation named ``*flash*`` its own padding and mask handling). A plain packed
training row ``query [1, H, T, D]`` becomes ``[T, H, D]`` and goes through one ``flash_attn_varlen_func`` call
with the row's example boundaries (``cu_seq_lens_q`` from the packed batch, else the position restarts): causal,
the module's softmax scale, its sliding window as ``window_size=(window - 1, 0)`` (query ``i`` sees keys
``i - window < j <= i``, as transformers' mask), soft-capping where the installed flash-attn has it (2.6+), grouped
query attention natively. Anything flash-attn cannot take (not CUDA, fp32, head size over 256, a soft cap on an
older flash-attn) and anything that is not a plain packed row goes to :func:`packed_sdpa_attention` as before;
each such reason is logged once.

flash-attn is imported on the first call that needs it, never at import time (it has no CPU build). Without it,
``attention: flash_varlen`` takes torch's own varlen attention (``torch.nn.attention.varlen.varlen_attn``, torch
2.10 and later: flash-attention built into torch, with its backward) through :func:`torch_varlen`, which speaks
flash-attn's calling convention; it has no soft cap and no dropout, so those calls fall back as above.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import torch
from transformers import AttentionInterface

from tuneforge.kernels.packed_attention import VARLEN_NAME, packed_sdpa_attention

log = logging.getLogger(__name__)
NAME = VARLEN_NAME
MAX_HEAD_DIM = 256           # flash-attn 2's kernels: head sizes up to 256
_told: set[str] = set()


def torch_varlen_available() -> bool:
    """Whether this torch has its own varlen attention (``torch.nn.attention.varlen.varlen_attn``)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                 softmax_scale: float | None = None, causal: bool = True,
                 window_size: tuple[int, int] | None = None) -> torch.Tensor:
    """flash-attn's ``flash_attn_varlen_func`` (the arguments :func:`packed_varlen_attention` passes) through torch's
    ``varlen_attn``: ``[T, H, D]`` tensors, int32 boundaries, ``window_size=(left, 0)`` causal with a window."""
    from torch.nn.attention.varlen import varlen_attn

    if dropout_p or not causal:
        raise ValueError("torch's varlen attention: causal and without dropout only")
    left = window_size[0] if window_size is not None else -1
    gqa: dict[str, Any] = {}
    if k.shape[1] != q.shape[1]:
        if _takes_gqa(varlen_attn):
            gqa["enable_gqa"] = True
        else:               # torch 2.10-2.11's varlen_attn has no enable_gqa: each key/value head serves its group
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=softmax_scale,
                      window_size=(left, 0), **gqa)
    return out[0] if isinstance(out, tuple) else out        # (out, lse) only when return_aux asks for it


@functools.cache
def _takes_gqa(varlen_attn: Any) -> bool:
    """Whether torch's ``varlen_attn`` has ``enable_gqa`` (2.12 and later); else :func:`torch_varlen` repeats the
    key/value heads itself."""
    return "enable_gqa" in inspect.signature(varlen_attn).parameters


@functools.cache
def varlen_function() -> Any:
    """flash-attn's ``flash_attn_varlen_func`` (imported here, once), else :func:`torch_varlen`."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        if torch_varlen_available():
            return torch_varlen
        raise
    return flash_attn_varlen_func


@functools.cache
def supports_softcap() -> bool:
    return "softcap" in inspect.signature(varlen_function()).parameters


def _fallback_reason(query: torch.Tensor, softcap: float | None) -> str | None:
    if query.device.type != "cuda":
        return f"tensors on {query.device.type}"
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"{str(query.dtype).removeprefix('torch.')} attention (flash-attn takes fp16/bf16)"
    if query.shape[-1] > MAX_HEAD_DIM:
        return f"head size {query.shape[-1]} > {MAX_HEAD_DIM}"
    if softcap is not None and not supports_softcap():
        return "soft-capped scores need flash-attn >= 2.6 (torch's varlen attention has no soft cap)"
    return None


def cu_seqlens_of(position_ids: torch.Tensor, T: int) -> torch.Tensor:
    """``[n + 1]`` int32 example boundaries of a packed row from its restarting ``position_ids``."""
    pos = position_ids.reshape(-1)[:T]
    starts = (pos == 0).nonzero().flatten()
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    return torch.cat([starts, starts.new_tensor([T])]).to(torch.int32)


_last_row: list[Any] = [None, None, 0]     # (the caller's tensor, int32 boundaries, longest example)


def _row_boundaries(cu_seqlens: torch.Tensor | None, position_ids: torch.Tensor, T: int,
                    device: torch.device) -> tuple[torch.Tensor, int]:
    """int32 ``cu_seqlens`` on ``device`` and the longest example, computed once per forward: every layer gets the
    same tensor from the caller, and the maximum costs a device sync."""
    source = position_ids if cu_seqlens is None else cu_seqlens
    if _last_row[0] is source:
        return _last_row[1], _last_row[2]
    cu = cu_seqlens_of(position_ids, T) if cu_seqlens is None else cu_seqlens.to(device=device, dtype=torch.int32)
    cu = cu.to(device)
    _last_row[:] = [source, cu, int(cu.diff().max())]
    return _last_row[1], _last_row[2]


def packed_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """``query [1, H, T, D]``, ``key/value [1, H_kv, T, D]`` -> ``[1, T, H, D]``, causal within each example."""
    plain_row = (attention_mask is None and position_ids is not None and query.shape[0] == 1
                 and query.shape[2] == key.shape[2])
    softcap = kwargs.get("softcap")
    reason = _fallback_reason(query, softcap) if plain_row else None
    if reason is None and plain_row and kwargs.get("tuneforge_tree") is not None:
        reason = "shared-prompt rows (a mask per segment, which the varlen kernel cannot take)"
    if reason is None and plain_row and dropout and module.training and varlen_function() is torch_varlen:
        reason = "attention dropout (torch's varlen attention has none)"
    if not plain_row or reason is not None:
        if reason is not None and reason not in _told:
            _told.add(reason)
            log.info("packed attention: per-example SDPA for this call (%s)", reason)
        return packed_sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     position_ids=position_ids, **kwargs)
    assert position_ids is not None           # part of plain_row
    cu, max_len = _row_boundaries(kwargs.get("cu_seq_lens_q"), position_ids, query.shape[2], query.device)
    window = kwargs.get("sliding_window")
    extra: dict[str, Any] = {}
    if window is not None:
        extra["window_size"] = (int(window) - 1, 0)
    if softcap is not None:
        extra["softcap"] = float(softcap)
    out = varlen_function()(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu, cu, max_len, max_len,
        dropout_p=dropout if module.training else 0.0, softmax_scale=scaling, causal=True, **extra)
    return out.unsqueeze(0), None             # [T, H, D] -> [1, T, H, D]


AttentionInterface.register(NAME, packed_varlen_attention)
