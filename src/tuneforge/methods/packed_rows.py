"""Helpers for padding-free packed rows, shared by the methods that cannot use the plain forward.

A packed row holds several examples back to back in one row of shape ``[1, T]``; ``position_ids``
restart at 0 at the first token of each example. An example is a *segment* ``[start, end)``.
"""

from __future__ import annotations

import torch


def segment_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the examples in a packed row, from ``position_ids`` of shape ``[1, T]``.

    Raises if the row is not a concatenation of ``0, 1, ..., L_i - 1`` runs (such a row would be
    silently mis-masked).
    """
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError(f"packed rows have position_ids of shape [1, T]; got {tuple(position_ids.shape)}")
    pos = position_ids[0].tolist()
    if not pos or pos[0] != 0:
        raise ValueError("a packed row must start at position 0")
    starts = [i for i, p in enumerate(pos) if p == 0]
    bounds = list(zip(starts, starts[1:] + [len(pos)]))
    for start, end in bounds:
        if pos[start:end] != list(range(end - start)):
            raise ValueError(f"position_ids {pos[start:end][:8]}... of the example at [{start}, {end}) are not 0, 1, 2, ...")
    return bounds


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``[T]`` LongTensor: index of the example each token belongs to."""
    return (position_ids[0] == 0).long().cumsum(0) - 1
