"""Prefix tuning (Li & Liang 2021) through peft.

Every attention layer ``l`` gets ``P = num_virtual_tokens`` trained key/value vectors prepended to its
keys and values: ``attn(q, [K_l^prefix; K], [V_l^prefix; V])``. peft feeds them in as a KV cache
(``past_key_values``) built by ``PeftModel.get_prompt``; real tokens then sit at positions ``P, P+1, ...``.
For grouped-query attention the prefix has the *key/value* width ``kv_heads * head_dim``, so the
trainable parameters are ``num_layers * 2 * P * kv_heads * head_dim``. With ``reparameterize: true``
(peft's ``prefix_projection``) the prefix is produced by an MLP from a ``P x hidden`` embedding during
training (Li & Liang's stabilisation); only the resulting prefix is saved.

Packed rows: the plain call would pass ``past_key_values``, which switches off transformers' detection of
packed rows from ``position_ids`` and lets examples attend to each other. :func:`forward_for_loss`
builds the block-causal mask explicitly: each token sees the whole prefix plus the earlier tokens of its
own example, with positions ``P + position_ids``, exactly as if each example ran alone.
"""

from __future__ import annotations

import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model

from tuneforge.config import PrefixConfig
from tuneforge.methods.packed_rows import segment_bounds, segment_ids


def peft_prefix_config(cfg: PrefixConfig) -> PrefixTuningConfig:
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
                              prefix_projection=cfg.reparameterize, encoder_hidden_size=cfg.encoder_hidden_size)


def apply_prefix(model: torch.nn.Module, cfg: PrefixConfig) -> PeftModel:
    attn = getattr(model.config, "_attn_implementation", "sdpa")
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"method 'prefix' needs attn_implementation 'sdpa' or 'eager' (got {attn!r}): packed rows "
                         "use an explicit 4D attention mask")
    return get_peft_model(model, peft_prefix_config(cfg))


def packed_prefix_mask(position_ids: torch.Tensor, num_virtual_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[1, 1, T, P + T]``: 0 where query ``i`` may attend, the dtype's minimum elsewhere.

    Query ``i`` may attend to every prefix slot ``j < P`` and to token ``P + j`` iff ``j <= i`` and
    tokens ``i`` and ``j`` belong to the same example.
    """
    seg = segment_ids(position_ids)
    T = seg.shape[0]
    idx = torch.arange(T, device=seg.device)
    own = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    allowed = torch.cat([torch.ones(T, num_virtual_tokens, dtype=torch.bool, device=seg.device), own], dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def forward_for_loss(model: PeftModel, input_ids: torch.Tensor, position_ids: torch.Tensor,
                     keep_idx: torch.Tensor) -> torch.Tensor:
    """Logits ``[K, V]`` at positions ``keep_idx [K]`` of the packed row ``input_ids [1, T]``.

    Equal (up to float rounding) to running each example of the row alone through ``model``.
    """
    segment_bounds(position_ids)  # validates the row
    P = model.active_peft_config.num_virtual_tokens
    base = model.get_base_model()
    past = model.get_prompt(batch_size=1, max_cache_len=input_ids.shape[1] + P)
    dtype = next(p for p in base.parameters() if p.dtype.is_floating_point).dtype
    out = base(input_ids=input_ids, position_ids=position_ids + P, past_key_values=past,
               attention_mask=packed_prefix_mask(position_ids, P, dtype), use_cache=False, logits_to_keep=keep_idx)
    return out.logits.squeeze(0)   # a view: indexing [0] would zero-fill a (1, K, V) gradient in backward
