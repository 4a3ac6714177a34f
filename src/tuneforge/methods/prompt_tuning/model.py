"""Prompt tuning (Lester et al. 2021) through peft.

A soft prompt ``S: (P, hidden)`` with ``P = num_virtual_tokens`` is prepended to the input embeddings:
``model([S; E(x)])``. Only ``S`` trains: ``P * hidden`` parameters. ``init_text`` initialises ``S`` from
the embeddings of that text's tokens (repeated or cut to ``P`` tokens, as peft does); without it, from
the embeddings of ``P`` tokens drawn at random from the vocabulary (Lester et al.'s "sampled vocab"
init, which trains better than peft's N(0, 1) default at the embedding scale of small models).

Packed rows: peft prepends ``S`` once per row and drops ``position_ids``, so examples would share one
prompt and attend to each other. :func:`forward_for_loss` re-packs the row as ``[S; x_1][S; x_2]...``
with positions restarting at 0 for each ``[S; x_i]``; transformers then builds the block-causal mask
from those positions, and each example computes exactly what it would alone.

Generation: :func:`generate` feeds ``[S; E(x)]`` to transformers' ``generate`` as ``inputs_embeds``
(see its docstring for why peft's own ``generate`` is not used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from peft import PeftModel, PromptTuningConfig, PromptTuningInit, get_peft_model

from tuneforge.data.packing import example_lengths
from tuneforge.methods.peft_adapters import virtual_tokens_are_disabled
from tuneforge.methods.prompt_tuning.config import PromptConfig
from tuneforge.methods.registry import Generates

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def peft_prompt_config(cfg: PromptConfig) -> PromptTuningConfig:
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
                              prompt_tuning_init=PromptTuningInit.RANDOM)


def init_token_ids(cfg: PromptConfig, tokenizer, vocab_size: int) -> torch.Tensor:
    """``P`` token ids whose embeddings initialise the soft prompt."""
    P = cfg.num_virtual_tokens
    if cfg.init_text is None:
        return torch.randint(0, vocab_size, (P,))
    if tokenizer is None:
        raise ValueError("prompt.init_text needs the tokenizer: call apply_method(model, config, tokenizer)")
    ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"prompt.init_text {cfg.init_text!r} has no tokens; write some text or remove the key")
    ids = (ids * (P // len(ids) + 1))[:P]
    return torch.tensor(ids)


def apply_prompt(model: PreTrainedModel, cfg: PromptConfig, tokenizer=None) -> PeftModel:
    embeddings = model.get_input_embeddings().get_parameter("weight")
    ids = init_token_ids(cfg, tokenizer, embeddings.shape[0])
    peft_model = get_peft_model(model, peft_prompt_config(cfg))
    soft = peft_model.prompt_encoder[peft_model.active_adapter].get_parameter("embedding.weight")
    with torch.no_grad():
        soft.copy_(embeddings[ids.to(embeddings.device)].to(soft.dtype))
    return peft_model


def word_embeddings(model: PeftModel) -> torch.nn.Module:
    """The base model's token embedding that peft found (peft's attribute is typed as None)."""
    return cast(torch.nn.Module, model.word_embeddings)


def forward_for_loss(model: PeftModel, input_ids: torch.Tensor, position_ids: torch.Tensor,
                     keep_idx: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
    """Logits ``[K, V]`` at positions ``keep_idx [K]`` of the packed row ``input_ids [1, T]``.

    ``lengths``: the examples' lengths (the packed batch's; derived from ``position_ids`` when omitted).
    Equal (up to float rounding) to running each example of the row alone through ``model``.
    """
    lengths = lengths or example_lengths(position_ids)
    ends = torch.tensor(lengths).cumsum(0).tolist()
    bounds = list(zip([0, *ends[:-1]], ends, strict=True))
    P = model.active_peft_config.num_virtual_tokens
    base = model.get_base_model()
    if virtual_tokens_are_disabled(model):
        return base(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                    logits_to_keep=keep_idx).logits.squeeze(0)
    embeds = word_embeddings(model)(input_ids)[0]                       # [T, H]
    soft = model.get_prompt(batch_size=1)[0].to(embeds.dtype)           # [P, H]
    pieces, positions = [], []
    for start, end in bounds:
        pieces += [soft, embeds[start:end]]
        positions.append(torch.arange(P + end - start, device=input_ids.device))
    row = torch.cat(pieces)[None]                                       # [1, T + n*P]
    new_pos = torch.cat(positions)[None]
    # a token at row index t of example i moves to t + (i + 1) * P
    shift = torch.zeros(input_ids.shape[1], dtype=torch.long, device=input_ids.device)
    for i, (start, end) in enumerate(bounds):
        shift[start:end] = (i + 1) * P
    keep = keep_idx.to(input_ids.device)
    out = base(inputs_embeds=row, position_ids=new_pos, use_cache=False, logits_to_keep=keep + shift[keep])
    return out.logits.squeeze(0)   # a view: indexing [0] would zero-fill a (1, K, V) gradient in backward


@torch.no_grad()
def generate(model: PeftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers' ``generate`` on the base model from the embeddings ``[S; E(x)]``.

    ``input_ids [B, T]`` (left-padded, with ``attention_mask [B, T]``) -> what ``generate`` returns, its
    sequences ``[B, T + new]`` as for any model. The soft prompt ``S`` goes in front of each row with
    attention mask 1, so (positions are the mask's running count) ``S`` sits at positions ``0..P-1`` and
    the real tokens at ``P, P+1, ...`` even in left-padded rows: what :func:`forward_for_loss` trains.

    Why not peft's ``PeftModelForCausalLM.generate``: peft 0.21.2 decides whether to prepend the prompt
    by looking for the KV cache under ``past_key_values``; transformers 5.24 passes it as ``cache``, so
    peft never sees it, and its generation no longer matches the training forward. This path uses only
    public transformers API and works on 5.23 and 5.24.
    """
    base = model.get_base_model()
    B = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if virtual_tokens_are_disabled(model):
        return cast(Generates, base).generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    embeds = word_embeddings(model)(input_ids)                                  # [B, T, H]
    soft = model.get_prompt(batch_size=B).to(embeds.dtype)                      # [B, P, H]
    P = soft.shape[1]
    ones = torch.ones((B, P), dtype=attention_mask.dtype, device=attention_mask.device)
    mask = torch.cat([ones, attention_mask], dim=1)
    out = cast(Generates, base).generate(inputs_embeds=torch.cat([soft, embeds], dim=1), attention_mask=mask, **kwargs)
    # from embeddings alone, transformers returns only the new tokens: put the prompt's ids back in front
    if isinstance(out, torch.Tensor):
        return torch.cat([input_ids, out], dim=1)
    out.sequences = torch.cat([input_ids, out.sequences], dim=1)
    return out
