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

Generation: :func:`generate` hands the prefix to transformers' ``generate`` as a pre-filled KV cache
(see its docstring for why peft's own ``generate`` is not used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model

from tuneforge.data.packing import example_index, example_lengths
from tuneforge.methods.peft_adapters import virtual_tokens_are_disabled
from tuneforge.methods.prefix_tuning.config import PrefixConfig
from tuneforge.methods.registry import Generates
from tuneforge.models.transformers_compat import cache_argument

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def peft_prefix_config(cfg: PrefixConfig) -> PrefixTuningConfig:
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
                              prefix_projection=cfg.reparameterize, encoder_hidden_size=cfg.encoder_hidden_size)


def apply_prefix(model: PreTrainedModel, cfg: PrefixConfig) -> PeftModel:
    attn = getattr(model.config, "_attn_implementation", "sdpa")
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"method 'prefix' needs attn_implementation 'sdpa' or 'eager' (got {attn!r}): packed rows "
                         "use an explicit 4D attention mask")
    return get_peft_model(model, peft_prefix_config(cfg))


def packed_prefix_mask(lengths: list[int], num_virtual_tokens: int, dtype: torch.dtype,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """Additive mask ``[1, 1, T, P + T]`` for a row of examples of ``lengths``: 0 where query ``i`` may
    attend, the dtype's minimum elsewhere.

    Query ``i`` may attend to every prefix slot ``j < P`` and to token ``P + j`` iff ``j <= i`` and
    tokens ``i`` and ``j`` belong to the same example.
    """
    seg = example_index(lengths, device)
    T = seg.shape[0]
    idx = torch.arange(T, device=seg.device)
    own = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    allowed = torch.cat([torch.ones(T, num_virtual_tokens, dtype=torch.bool, device=seg.device), own], dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def forward_for_loss(model: PeftModel, input_ids: torch.Tensor, position_ids: torch.Tensor,
                     keep_idx: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
    """Logits ``[K, V]`` at positions ``keep_idx [K]`` of the packed row ``input_ids [1, T]``.

    ``lengths``: the examples' lengths (the packed batch's; derived from ``position_ids`` when omitted).
    Equal (up to float rounding) to running each example of the row alone through ``model``.
    """
    lengths = lengths or example_lengths(position_ids)
    P = model.active_peft_config.num_virtual_tokens
    base = model.get_base_model()
    if virtual_tokens_are_disabled(model):
        return base(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                    logits_to_keep=keep_idx).logits.squeeze(0)
    past = model.get_prompt(batch_size=1, max_cache_len=input_ids.shape[1] + P)
    dtype = next(p for p in base.parameters() if p.dtype.is_floating_point).dtype
    out = base(input_ids=input_ids, position_ids=position_ids + P, **{cache_argument(base): past},
               attention_mask=packed_prefix_mask(lengths, P, dtype, input_ids.device), use_cache=False,
               logits_to_keep=keep_idx)
    return out.logits.squeeze(0)   # a view: indexing [0] would zero-fill a (1, K, V) gradient in backward


PLACEHOLDER_ID = 0   # stands for a virtual token in generate's input_ids; never embedded (the cache holds it)


@torch.no_grad()
def generate(model: PeftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers' ``generate`` on the base model with the trained prefix as a pre-filled KV cache.

    ``input_ids [B, T]`` (left-padded, with ``attention_mask [B, T]``) -> what ``generate`` returns, its
    sequences ``[B, T + new]`` as for any model. The cache holds the ``P`` prefix key/values of every layer;
    ``input_ids`` get ``P`` placeholder columns in front (attention mask 1) so that transformers treats the
    cache as covering them, processes only the real tokens, and gives them positions ``P, P+1, ...``: the
    positions :func:`forward_for_loss` trains with. The placeholders are removed from the result.

    Why not peft's ``PeftModelForCausalLM.generate``: peft 0.21.2 injects the prefix in
    ``prepare_inputs_for_generation`` under the key ``past_key_values``; transformers 5.24 renamed the
    cache argument to ``cache``, so it passes its own empty cache under the new name and ignores peft's
    (a FutureWarning says so), and the model generates as if it had no prefix. This path uses only
    public transformers API and works on 5.23 and 5.24.
    """
    P = model.active_peft_config.num_virtual_tokens
    base = model.get_base_model()
    B = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if virtual_tokens_are_disabled(model):
        return cast(Generates, base).generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    kwargs.pop("use_cache", None)        # the prefix lives in the cache: generation must use one
    placeholders = torch.full((B, P), PLACEHOLDER_ID, dtype=input_ids.dtype, device=input_ids.device)
    ids = torch.cat([placeholders, input_ids], dim=1)
    ones = torch.ones((B, P), dtype=attention_mask.dtype, device=attention_mask.device)
    mask = torch.cat([ones, attention_mask], dim=1)
    cache = model.get_prompt(batch_size=B)
    out = cast(Generates, base).generate(input_ids=ids, attention_mask=mask, use_cache=True,
                                         **{cache_argument(base): cache}, **kwargs)
    if isinstance(out, torch.Tensor):
        return out[:, P:]
    out.sequences = out.sequences[:, P:]
    return out
