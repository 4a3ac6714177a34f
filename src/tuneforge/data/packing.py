"""Padding-free batches: examples packed end to end into one row, never attending to each other.

A micro-batch of ``n`` examples becomes one row of ``T = sum(len_i)`` tokens (batch dimension 1, no pad):

* ``input_ids``    (1, T): the examples' tokens, concatenated;
* ``position_ids`` (1, T): restart at 0 for each example, so RoPE sees each example as if alone. With
  ``attention_mask=None`` transformers (>= 5) derives a block-causal mask from the restarts: token ``t`` of
  example ``k`` attends only to tokens ``<= t`` of example ``k``;
* ``targets``      (1, T): ``targets[p]`` is the token position ``p`` must predict (``input_ids[p+1]``)
  when that next token belongs to the same example and is trained, else -100. The last token of an
  example never predicts the first token of the next one.
* ``loss_positions`` (L,): positions with a target, so the LM head runs on these ``L`` positions only.

The loss of a step is ``sum of token losses / number of target tokens in the whole step`` (all
micro-batches of a gradient-accumulation step together), which equals the token-weighted mean over the
same examples run one by one, unpadded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from tuneforge.data.rendering import TokenizedExample

IGNORE = -100


@dataclass
class PackedBatch:
    input_ids: torch.Tensor       # (1, T) long
    position_ids: torch.Tensor    # (1, T) long
    targets: torch.Tensor         # (1, T) long, -100 where no loss
    loss_positions: torch.Tensor  # (L,) long
    num_examples: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_positions.numel())

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device),
                           self.loss_positions.to(device), self.num_examples)


def pack(examples: Sequence[TokenizedExample]) -> PackedBatch:
    ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    for ex in examples:
        n = len(ex.input_ids)
        ids.extend(ex.input_ids)
        positions.extend(range(n))
        targets.extend(ex.input_ids[p + 1] if ex.trained[p + 1] else IGNORE for p in range(n - 1))
        targets.append(IGNORE)
    targets_t = torch.tensor(targets, dtype=torch.long)
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long).unsqueeze(0),
        position_ids=torch.tensor(positions, dtype=torch.long).unsqueeze(0),
        targets=targets_t.unsqueeze(0),
        loss_positions=(targets_t != IGNORE).nonzero().squeeze(1),
        num_examples=len(examples),
    )


def micro_batches(examples: Sequence[TokenizedExample], batch_size: int, seed: int, epoch: int,
                  shuffle: bool = True, start: int = 0) -> Iterator[PackedBatch]:
    """One epoch of packed micro-batches of ``batch_size`` examples, shuffled by ``(seed, epoch)``,
    from micro-batch number ``start`` on (the earlier ones are skipped without being packed)."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    for first in range(start * batch_size, len(order), batch_size):
        yield pack([examples[i] for i in order[first:first + batch_size]])


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    return max(1, -(-num_examples // batch_size))
