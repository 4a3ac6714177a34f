"""Held-out loss and token-weighted perplexity, with bootstrap intervals over examples.

The loss is the mean cross-entropy (nats) over every trained token of the held-out examples (the
assistant answers, as in training: the same rendering and loss mask), i.e. sum of per-example loss sums
over the total trained tokens; perplexity is ``exp`` of it. Both intervals come from one bootstrap of
(per-example loss sum, per-example tokens) pairs, so perplexity's bounds are ``exp`` of the loss's.
The per-example sums come from :func:`tuneforge.methods.loss.packed_example_loss_sums` on packed rows
(examples never see each other), the same path the trainer's validation loss takes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from tuneforge.data.formats import Example
from tuneforge.data.packing import micro_batches
from tuneforge.data.rendering import TokenizedExample, tokenize_example
from tuneforge.evaluation.bootstrap import Interval, ratio_interval
from tuneforge.methods.loss import packed_example_loss_sums


@torch.no_grad()
def example_losses(model: torch.nn.Module, examples: Sequence[TokenizedExample], method: str = "base",
                   batch_size: int = 8) -> tuple[list[float], list[int]]:
    """Per example: (summed token cross-entropy over its trained tokens, number of trained tokens)."""
    model.eval()
    device = next(model.parameters()).device
    sums = [0.0] * len(examples)
    for batch in micro_batches(list(examples), batch_size, seed=0, epoch=0, shuffle=False):
        per = packed_example_loss_sums(model, batch.to(device), method).tolist()
        for i, value in zip(batch.example_ids, per, strict=True):
            sums[i] = value
    return sums, [ex.num_trained for ex in examples]


def loss_and_perplexity(sums: list[float], tokens: list[int], resamples: int = 1000, seed: int = 0
                        ) -> dict[str, dict]:
    loss = ratio_interval(sums, tokens, resamples=resamples, seed=seed)
    ppl = Interval(math.exp(loss.value), math.exp(loss.low), math.exp(loss.high), loss.n)
    return {"loss": loss.to_dict(), "perplexity": ppl.to_dict(), "tokens": int(sum(tokens))}


def tokenize_heldout(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, train_on: str = "assistant",
                     max_length: int = 4096, train_reasoning: bool = True) -> list[TokenizedExample]:
    """The held-out examples as training tokenizes them: the same rendering and loss mask (``train_on``,
    ``train_reasoning``: reasoning the run did not train is context here too), cut to ``max_length``."""
    out = []
    for ex in examples:
        tok = tokenize_example(ex, tokenizer, train_on, train_reasoning)
        out.append(TokenizedExample(tok.input_ids[:max_length], tok.trained[:max_length]))
    return [t for t in out if t.num_trained]


def text_windows(text: str, tokenizer: PreTrainedTokenizerBase, window: int = 256) -> list[TokenizedExample]:
    """Plain text cut into windows of ``window`` tokens, every token but each window's first a target."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = []
    for start in range(0, len(ids), window):
        chunk = ids[start:start + window]
        if len(chunk) > 1:
            out.append(TokenizedExample(chunk, [False] + [True] * (len(chunk) - 1)))
    return out
