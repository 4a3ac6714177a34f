"""Batched generation for evaluation: length-sorted, left-padded batches with the KV cache.

Prompts are sorted by token length (longest first) so that each batch pads little, left-padded so that
every row's last prompt token sits at the same position and generation starts together, and decoded
with transformers' KV cache (``use_cache=True``). Answers come back in the original order with, per
prompt, the prompt's token count, the tokens generated up to and including the end-of-turn token, and
whether it stopped before ``max_new_tokens``. ``tools`` (one list or None per conversation) are rendered into
that conversation's prompt as at training; a tool call ends with its turn (``</tool_call>`` is no end token),
and the call markers survive decoding even where the tokenizer marks them special. Greedy (``temperature == 0``)
output equals a one-prompt-at-a-time ``generate`` loop (tested); sampling is seeded once per call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from tuneforge.data.rendering import prompt_ids
from tuneforge.data.tool_formats import HERMES, ToolCallFormat
from tuneforge.methods import method_generate


@dataclass
class Generations:
    texts: list[str]
    prompt_tokens: list[int]
    new_tokens: list[int]
    stopped: list[bool]
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.new_tokens) / self.seconds if self.seconds > 0 else float("nan")


def _end_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """EOS and the chat template's end-of-turn tokens (the run's template: ``template:``), and ``<|im_end|>``."""
    from tuneforge.data.templates import end_of_turn_ids

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    return {i for i in (*end_of_turn_ids(tokenizer), im_end) if i is not None}


def _decoder(tokenizer: PreTrainedTokenizerBase, fmt: ToolCallFormat = HERMES) -> Callable[[list[int], bool], str]:
    """``decode(ids, tools)``: text without special tokens, except ``fmt``'s tool-call markers when ``tools``."""
    vocab = tokenizer.get_vocab()
    markers = {vocab[m] for m in fmt.tokens if m in vocab}
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    dropped = special - markers

    def decode(ids: list[int], tools: bool) -> str:
        if not tools or not markers:
            return tokenizer.decode(ids, skip_special_tokens=True).strip()
        return tokenizer.decode([t for t in ids if t not in dropped], skip_special_tokens=False).strip()
    return decode


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]],
             method: str | None = None, max_new_tokens: int = 32, batch_size: int = 16, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, progress: Callable[[int], None] | None = None,
             tools: list[list[dict] | None] | None = None, tool_format: ToolCallFormat = HERMES) -> Generations:
    """Answer every conversation (messages ending with a user turn, or a tool record's results) with ``model``.

    ``tools``: per conversation, the tool definitions its prompt renders (None: none); ``tool_format``: the format
    the answers write calls in (its marker tokens stay in the text of a conversation with tools).
    ``method``: the run's method name for :func:`tuneforge.methods.method_generate` (``None``: a plain model).
    ``progress(n)`` is called after each batch with the number of prompts it answered.
    """
    model.eval()
    tools = tools or [None] * len(conversations)
    ids = [prompt_ids(tokenizer, conv, tools=t) for conv, t in zip(conversations, tools, strict=True)]
    decode = _decoder(tokenizer, tool_format)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ends = _end_ids(tokenizer)
    device = next(model.parameters()).device
    texts: list[str] = [""] * len(ids)
    new_tokens = [0] * len(ids)
    stopped = [False] * len(ids)
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0
                else {"do_sample": False})
    if temperature > 0:
        torch.manual_seed(seed)
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        chunk = order[b:b + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in chunk], device=device)
        attention = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in chunk], device=device)
        out = method_generate(model, method, input_ids=input_ids, attention_mask=attention,
                              max_new_tokens=max_new_tokens, eos_token_id=sorted(ends), pad_token_id=pad,
                              use_cache=True, **sampling)
        for i, row in zip(chunk, out[:, width:].tolist(), strict=True):
            end = next((j for j, t in enumerate(row) if t in ends), None)
            kept = row if end is None else row[:end]
            new_tokens[i] = len(row) if end is None else end + 1
            stopped[i] = end is not None
            texts[i] = decode(kept, bool(tools[i]))
        if progress:
            progress(len(chunk))
    return Generations(texts, [len(x) for x in ids], new_tokens, stopped, time.perf_counter() - start)
