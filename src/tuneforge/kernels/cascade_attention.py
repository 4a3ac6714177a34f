"""Decode attention over a prefix shared by a group of rows, kept once ("cascade" attention, as FlashInfer and vLLM).

When many rows of a decode batch start with the same prompt blocks (a system turn and a ``tools`` block), the
serving engine keeps the keys and values of those blocks once per group (:class:`SharedPrefix`) and each row's
cache holds only what follows them. One decode step of row ``b`` (query ``q [H, D]``) then attends to two key
sets apart and merges the two softmax partials exactly:

* over its group's prefix ``K_p, V_p [P, D]`` (the queries of all the group's rows against one copy);
* over its own entries ``K_s, V_s [L, D]`` (its suffix: the answer so far and the prompt after the prefix), with
  the engine's mask ``[B, L]`` (padding out).

Each partial ``x`` gives ``o_x = softmax(s_x) V_x`` and ``lse_x = log sum exp(s_x)`` with ``s_x = scale * q K_x^T``;
the whole softmax over ``[K_p; K_s]`` is ``o = e^(lse_p - lse) o_p + e^(lse_s - lse) o_s`` with
``lse = logaddexp(lse_p, lse_s)``: the same result up to float rounding (tested against the concatenated cache
in float64).

Only plain scaled dot-product attention is computed here: no sliding window, no soft-capping, no attention sinks.
:func:`unsupported` says which models cannot use it (the engine then keeps every row's full cache, as before).
The function is registered with transformers' ``AttentionInterface`` as :data:`NAME`; the engine switches a
model to it only for the decode steps that have groups (:func:`cascade_step`), so that the attention-mask
registry does not know the name and transformers builds no mask (the step's mask is :attr:`Plan.mask`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel

NAME = "tuneforge_cascade"


@dataclass(eq=False)
class SharedPrefix:
    """One copy of a prompt prefix's keys and values, for every row whose prompt starts with it.

    Attributes:
        key: what identifies the prefix: ``(owner, tokens)``, owner being the base model or one load of an adapter.
        kv: ``[layers, 2, kv_heads, P, head_dim]``: the post-RoPE keys (``[:, 0]``) and values (``[:, 1]``) of
            the prefix's ``P`` tokens at positions ``0 .. P - 1``.
    """

    key: tuple
    kv: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.kv.shape[3])


@dataclass
class Plan:
    """What one decode step's attention needs besides the rows' own cache.

    Attributes:
        mask: ``[B, L]``, bool: the rows' own cache entries that are real (padding out), the step's token included.
        groups: ``(rows, prefix)`` pairs: row indices ``[n]`` (long) of the batch that share ``prefix`` (None:
            every row of the batch).
    """

    mask: torch.Tensor
    groups: list[tuple[torch.Tensor | None, SharedPrefix]]


_local = threading.local()          # .plan: the step being computed on this thread (set by cascade_step)


def cascade_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """``query [B, H, 1, D]``, the rows' own ``key/value [B, H_kv, L, D]`` -> ``[B, 1, H, D]``: attention over
    each row's group prefix (if any) and its own entries, merged by log-sum-exp."""
    plan: Plan | None = getattr(_local, "plan", None)
    if plan is None or query.shape[2] != 1:
        raise RuntimeError(f"{NAME} attention runs only inside a serving decode step (cascade_step)")
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise RuntimeError(f"{NAME} attention does not compute {name}: this model must not use it "
                               "(kernels.cascade_attention.unsupported)")
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out, lse = partial_attention(query, key, value, scale, plan.mask)
    for rows, prefix in plan.groups:
        kv = prefix.kv[layer]                                                  # [2, H_kv, P, D]
        if rows is None:                                                       # the whole batch: no gather
            p_out, p_lse = partial_attention(query, kv[0][None], kv[1][None], scale, None)
            out, lse = merge_partials(out, lse, p_out, p_lse)
            continue
        p_out, p_lse = partial_attention(query[rows], kv[0][None], kv[1][None], scale, None)
        out[rows], lse[rows] = merge_partials(out[rows], lse[rows], p_out, p_lse)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def partial_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                      mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``query [B, H, 1, D]`` over ``key/value [B or 1, H_kv, L, D]`` (GQA: ``H`` a multiple
    of ``H_kv``; a batch of 1 is shared by every query row) with ``mask [B, L]`` (True: attend; None: all).

    ``(out [B, H, 1, D], lse [B, H, 1])``, in float32 for half-precision inputs (as transformers' eager softmax),
    else in the input's dtype. Every row must attend to at least one key."""
    B, H, _, D = query.shape
    H_kv, L = key.shape[1], key.shape[2]
    work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    q = query.reshape(B, H_kv, H // H_kv, D)                     # the query heads that read each kv head
    if key.shape[0] == 1 and B > 1:                              # one prefix for every row: one matmul per kv head
        q = q.transpose(0, 1).reshape(1, H_kv, B * (H // H_kv), D)
    scores = torch.matmul(q, key.transpose(2, 3)).to(work) * scale          # [b, H_kv, rows x groups, L]
    if key.shape[0] == 1 and B > 1:
        scores = scores.reshape(H_kv, B, H // H_kv, L).transpose(0, 1)
    scores = scores.reshape(B, H, L)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, -1)                                       # [B, H]
    probs = torch.exp(scores - lse[..., None]).to(value.dtype)
    if key.shape[0] == 1 and B > 1:
        p = probs.reshape(B, H_kv, H // H_kv, L).transpose(0, 1).reshape(1, H_kv, B * (H // H_kv), L)
        out = torch.matmul(p, value).reshape(H_kv, B, H // H_kv, D).transpose(0, 1)
    else:
        out = torch.matmul(probs.reshape(B, H_kv, H // H_kv, L), value)
    return out.reshape(B, H, 1, D).to(work), lse[..., None]


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax over two disjoint key sets from each one's result ``out [B, H, 1, D]`` and ``lse [B, H, 1]``."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a * torch.exp(lse_a - lse)[..., None] + out_b * torch.exp(lse_b - lse)[..., None]
    return out, lse


def unsupported(model: torch.nn.Module) -> str | None:
    """Why the decode steps of ``model`` cannot use :func:`cascade_attention` (None: they can): a sliding window
    (a prefix may fall out of it), soft-capped scores (Gemma 2), an attention other than SDPA or eager."""
    base = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if base is None:
        return "not a transformers model"
    config = base.config
    config = getattr(config, "text_config", None) or config
    attn = base.config._attn_implementation
    if attn not in ("sdpa", "eager"):
        return f"attention {attn!r} (cascade decode needs 'sdpa' or 'eager')"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "soft-capped attention scores"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return f"layer types {sorted(set(layer_types))} (only full attention)"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return f"a sliding window of {config.sliding_window} tokens"
    return None


def model_configs(model: torch.nn.Module) -> list:
    """The distinct configs of the transformers models in ``model`` (what :func:`cascade_step` switches)."""
    seen: dict[int, object] = {}
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            seen.setdefault(id(m.config), m.config)
    return list(seen.values())


@contextlib.contextmanager
def cascade_step(configs: list, plan: Plan) -> Iterator[None]:
    """Run the forwards in the block with :func:`cascade_attention` over ``plan``: the models of ``configs``
    (:func:`model_configs`) switched to it, then back. Not re-entrant, not thread-safe: the serving engine's one
    model thread calls it."""
    previous = [c._attn_implementation for c in configs]
    _local.plan = plan
    try:
        for c in configs:
            c._attn_implementation = NAME
        yield
    finally:
        _local.plan = None
        for c, attn in zip(configs, previous, strict=True):
            c._attn_implementation = attn


AttentionInterface.register(NAME, cascade_attention)
