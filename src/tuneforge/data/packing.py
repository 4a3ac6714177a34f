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
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from tuneforge.data.rendering import TokenizedExample

IGNORE = -100


@dataclass
class PackedBatch:
    """A packed row and its example boundaries, computed once when packing and reused everywhere
    (per-example attention, prefix/prompt re-packing, per-example loss sums)."""

    input_ids: torch.Tensor       # (1, T) long
    position_ids: torch.Tensor    # (1, T) long
    targets: torch.Tensor         # (1, T) long, -100 where no loss
    loss_positions: torch.Tensor  # (L,) long
    num_examples: int
    lengths: list[int] = field(default_factory=list)            # tokens of each example, summing to T
    cu_seqlens: torch.Tensor | None = None                      # (n + 1,) long: start offsets, then T
    loss_example: torch.Tensor | None = None                    # (L,) long: example index of each loss position
    example_ids: list[int] = field(default_factory=list)        # where each example sits in the data set
    # shared-prompt rows (:func:`pack_shared_prompts`) only: the target of each loss position (a prompt's last
    # position predicts the first token of each of its completions, so ``targets[0, loss_positions]`` cannot say)
    loss_targets: torch.Tensor | None = None                    # (L,) long
    tree: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per segment: (allowed [n, n] bool, positions [n])

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_positions.numel())

    def to(self, device: torch.device | str) -> "PackedBatch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        tree = None if self.tree is None else [(a.to(device), p.to(device)) for a, p in self.tree]
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device),
                           self.loss_positions.to(device), self.num_examples, self.lengths, move(self.cu_seqlens),
                           move(self.loss_example), self.example_ids, move(self.loss_targets), tree)


def example_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the examples of a packed row, from ``position_ids`` of shape ``[1, T]`` (for rows that did not
    come from :func:`pack`, which records them).

    Raises if the row is not a concatenation of ``0, 1, ..., L_i - 1`` runs (such a row would be
    silently mis-masked).
    """
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError(f"packed rows have position_ids of shape [1, T]; got {tuple(position_ids.shape)}")
    pos = position_ids[0].tolist()
    if not pos or pos[0] != 0:
        raise ValueError("a packed row must start at position 0")
    starts = [i for i, p in enumerate(pos) if p == 0]
    bounds = list(zip(starts, starts[1:] + [len(pos)], strict=True))
    for start, end in bounds:
        if pos[start:end] != list(range(end - start)):
            raise ValueError(f"position_ids {pos[start:end][:8]}... of the example at [{start}, {end}) "
                             "are not 0, 1, 2, ...")
    return [end - start for start, end in bounds]


def example_index(lengths: list[int], device: torch.device | str | None = None) -> torch.Tensor:
    """``[T]`` long: index of the example each token of the row belongs to."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                   torch.tensor(lengths, device=device))


def pack(examples: Sequence[TokenizedExample]) -> PackedBatch:
    ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    lengths: list[int] = []
    for ex in examples:
        n = len(ex.input_ids)
        lengths.append(n)
        ids.extend(ex.input_ids)
        positions.extend(range(n))
        targets.extend(ex.input_ids[p + 1] if ex.trained[p + 1] else IGNORE for p in range(n - 1))
        targets.append(IGNORE)
    targets_t = torch.tensor(targets, dtype=torch.long)
    loss_positions = (targets_t != IGNORE).nonzero().squeeze(1)
    cu = torch.tensor([0, *lengths], dtype=torch.long).cumsum(0)
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long).unsqueeze(0),
        position_ids=torch.tensor(positions, dtype=torch.long).unsqueeze(0),
        targets=targets_t.unsqueeze(0),
        loss_positions=loss_positions,
        num_examples=len(examples),
        lengths=lengths,
        cu_seqlens=cu,
        loss_example=example_index(lengths)[loss_positions],
    )


def pack_shared_prompts(groups: Sequence[tuple[list[int], Sequence[list[int]]]]) -> PackedBatch:
    """One row of ``groups`` of ``(prompt, completions)`` (token ids), each prompt written once and followed by its
    completions: ``prompt + c_1 + ... + c_k`` is one segment of the row (``lengths``, ``cu_seqlens``), every
    completion trained on all its tokens.

    Each completion continues the prompt's positions (``P .. P + len(c) - 1``) and attends to the whole prompt and
    causally to itself, never to its siblings: ``tree`` holds each segment's ``allowed [n, n]`` mask and positions,
    which :func:`tuneforge.kernels.packed_attention.packed_sdpa_attention` reads (``tuneforge_tree``). This computes
    what ``pack([prompt + c_i for each i])`` computes (the prompt's keys and values are the same in every copy; its
    gradient is the copies' sum), for ``P + sum(len(c_i))`` tokens instead of ``k P + sum(len(c_i))``: GRPO's ``G``
    completions of one prompt (as Prefix Grouper, Liu et al. 2025). The first token of each completion is predicted
    at the prompt's last position, so ``loss_positions`` repeats it once per completion and ``loss_targets`` gives
    each loss position's target; examples (``loss_example``) are the completions, in order."""
    ids: list[int] = []
    positions: list[int] = []
    lengths: list[int] = []
    keep: list[int] = []
    targets: list[int] = []
    tree: list[tuple[torch.Tensor, torch.Tensor]] = []
    for prompt, completions in groups:
        start, P = len(ids), len(prompt)
        if P < 1 or any(len(c) < 1 for c in completions):
            raise ValueError("pack_shared_prompts: every prompt and completion needs at least one token")
        ids.extend(prompt)
        positions.extend(range(P))
        branch = [0] * P                                  # 0: the prompt; i: completion i
        for i, completion in enumerate(completions, 1):
            first = len(ids)
            keep.extend([start + P - 1] + list(range(first, first + len(completion) - 1)))
            targets.extend(completion)
            ids.extend(completion)
            positions.extend(range(P, P + len(completion)))
            branch.extend([i] * len(completion))
        n = len(ids) - start
        lengths.append(n)
        b = torch.tensor(branch)
        pos = torch.tensor(positions[start:])
        allowed = ((b[None, :] == 0) | (b[None, :] == b[:, None])) & (pos[None, :] <= pos[:, None])
        tree.append((allowed, pos))
    counts = [len(c) for _, completions in groups for c in completions]
    cu = torch.tensor([0, *lengths], dtype=torch.long).cumsum(0)
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long).unsqueeze(0),
        position_ids=torch.tensor(positions, dtype=torch.long).unsqueeze(0),
        targets=torch.full((1, len(ids)), IGNORE, dtype=torch.long),
        loss_positions=torch.tensor(keep, dtype=torch.long),
        num_examples=len(counts),
        lengths=lengths,
        cu_seqlens=cu,
        loss_example=example_index(counts),
        loss_targets=torch.tensor(targets, dtype=torch.long),
        tree=tree,
    )


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                start: int = 0) -> Iterator[list[int]]:
    """The one epoch order every objective trains in: the indices of ``n`` units (examples, or pairs for
    preference) shuffled by ``(seed, epoch)``, cut into micro-batches of ``batch_size``, from micro-batch
    ``start`` on (the earlier ones are skipped). Exact resume depends on every objective drawing from it."""
    order = list(range(n))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    for first in range(start * batch_size, n, batch_size):
        yield order[first:first + batch_size]


def micro_batches(examples: Sequence[TokenizedExample], batch_size: int, seed: int, epoch: int,
                  shuffle: bool = True, start: int = 0) -> Iterator[PackedBatch]:
    """One epoch of packed micro-batches of ``batch_size`` examples in :func:`epoch_order`, from micro-batch
    number ``start`` on (the earlier ones are skipped without being packed)."""
    for ids in epoch_order(len(examples), batch_size, seed, epoch, shuffle, start):
        batch = pack([examples[i] for i in ids])
        batch.example_ids = ids
        yield batch


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    return max(1, -(-num_examples // batch_size))
