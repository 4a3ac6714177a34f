"""GRPO's rollouts kept in a checkpoint, so that a run resumed inside a ``num_iterations > 1`` block trains the
block's remaining steps on the very rollouts the uninterrupted run trains on.

With ``num_iterations > 1`` each block of micro-batches is sampled once, at its first step, and trained
``num_iterations`` steps in a row (:mod:`tuneforge.training.objectives.grpo`). A checkpoint taken inside a block
cannot give them back by sampling again: the policy has moved since the block's first step. So every checkpoint
holds :data:`ROLLOUTS_FILE` (a safetensors file, written into the checkpoint's fresh folder and made current with it
by :class:`~tuneforge.training.checkpoint.CheckpointDir`, so it is as atomic as the weights) with, per rollout: the
trained sequences' tokens (``tokens [S]`` int64, all sequences end to end, ``lengths [k]`` and ``prompt_lengths
[k]``), ``advantages [k]``, the reference and sampling policy's log-probabilities ``ref``/``old [k, T]`` (fp32,
where the rollout has them), and in the file's metadata its key ``(epoch, micro-batch)`` and its metric sums
(JSON). Reading it back re-packs the sequences (:func:`~tuneforge.data.packing.pack` is deterministic), so the
loss sees the same tensors bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tuneforge.data.packing import PackedBatch, pack
from tuneforge.data.rendering import TokenizedExample

ROLLOUTS_FILE = "grpo_rollouts.safetensors"


@dataclass
class Rollout:
    """A micro-batch's sampled completions, ready to train: ``sequences`` (the kept ``prompt + completion``
    sequences, completion tokens trained), ``packed`` (them packed, on the device), ``advantages [k]``, ``ref`` and
    ``old`` log-probabilities ``[k, T]`` (or None), and the metric sums of all its completions (kept or not)."""

    sequences: list[TokenizedExample]
    packed: PackedBatch
    advantages: torch.Tensor
    ref: torch.Tensor | None
    old: torch.Tensor | None
    metrics: dict[str, float]

    @property
    def num_sequences(self) -> int:
        return self.packed.num_examples


def pack_sequences(sequences: list[TokenizedExample], device: torch.device | str) -> PackedBatch:
    """``sequences`` packed on ``device``; none: a one-token row without a trained token and ``num_examples`` 0."""
    packed = pack(sequences if sequences else [TokenizedExample([0], [False])]).to(device)
    if not sequences:
        packed.num_examples = 0
    return packed


def save_rollouts(rollouts: dict[tuple[int, int], Rollout], path: Path) -> None:
    """Write ``rollouts`` (key ``(epoch, micro-batch)`` -> rollout) to ``path`` (module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    keys = []
    for i, (key, r) in enumerate(sorted(rollouts.items())):
        keys.append({"key": list(key), "metrics": r.metrics, "ref": r.ref is not None, "old": r.old is not None})
        ids = [t for s in r.sequences for t in s.input_ids]
        tensors[f"{i}.tokens"] = torch.tensor(ids, dtype=torch.long)
        tensors[f"{i}.lengths"] = torch.tensor([len(s.input_ids) for s in r.sequences], dtype=torch.long)
        tensors[f"{i}.prompt_lengths"] = torch.tensor([s.trained.index(True) if True in s.trained else len(s.trained)
                                                       for s in r.sequences], dtype=torch.long)
        tensors[f"{i}.advantages"] = r.advantages.detach().cpu().contiguous()
        for name in ("ref", "old"):
            value = getattr(r, name)
            if value is not None:
                tensors[f"{i}.{name}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"rollouts": json.dumps(keys)})


def load_rollouts(path: Path, device: torch.device | str) -> dict[tuple[int, int], Rollout]:
    """The rollouts :func:`save_rollouts` wrote to ``path``, their tensors on ``device``."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        keys = json.loads((f.metadata() or {})["rollouts"])
    out: dict[tuple[int, int], Rollout] = {}
    for i, entry in enumerate(keys):
        ids, starts = tensors[f"{i}.tokens"].tolist(), 0
        sequences = []
        for length, prompt in zip(tensors[f"{i}.lengths"].tolist(), tensors[f"{i}.prompt_lengths"].tolist(),
                                  strict=True):
            trained = [False] * prompt + [True] * (length - prompt)
            sequences.append(TokenizedExample(ids[starts:starts + length], trained))
            starts += length
        out[(int(entry["key"][0]), int(entry["key"][1]))] = Rollout(
            sequences, pack_sequences(sequences, device), tensors[f"{i}.advantages"].to(device),
            tensors[f"{i}.ref"].to(device) if entry["ref"] else None,
            tensors[f"{i}.old"].to(device) if entry["old"] else None,
            {k: float(v) for k, v in entry["metrics"].items()})
    return out
