"""GRPO's rollouts kept in a checkpoint, so that a run resumed inside a ``num_iterations > 1`` block trains the
block's remaining steps on the very rollouts the uninterrupted run trains on.

With ``num_iterations > 1`` each block of micro-batches is sampled once, at its first step, and trained
``num_iterations`` steps in a row (:mod:`tuneforge.training.objectives.grpo`). A checkpoint taken inside a block
cannot give them back by sampling again: the policy has moved since the block's first step. So every checkpoint
holds :data:`ROLLOUTS_FILE` (a safetensors file, written into the checkpoint's fresh folder and made current with it
by :class:`~tuneforge.training.checkpoint.CheckpointDir`, so it is as atomic as the weights) with, per rollout: its
trained groups' tokens (int64, end to end: ``prompts`` with ``prompt_lengths [g]``, ``completions`` with
``completion_lengths [k]``, ``group_sizes [g]``: kept completions per group), ``advantages [k]``, the reference and
sampling policy's log-probabilities ``ref``/``old [k, T]`` (fp32, where the rollout has them), and in the file's
metadata its key ``(epoch, micro-batch)`` and its metric sums (JSON). Reading it back packs the groups again (packing
is deterministic), so the loss sees the same tensors bit for bit.

Several processes (DDP): each samples only its own micro-batches, so each writes its own file
(:func:`rollouts_file`: process 0 the one above, process ``r`` ``grpo_rollouts.rank<r>.safetensors``). A resumed run
reads every process's file on every process (a rollout is found by its key): so it resumes on another number of
processes too (with ``gradient_accumulation_steps`` to match, as any resume: the trainer's fingerprint).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tuneforge.data.packing import PackedBatch

ROLLOUTS_FILE = "grpo_rollouts.safetensors"


def rollouts_file(rank: int) -> str:
    """The file of process ``rank``'s rollouts in a checkpoint: each process (DDP) holds only its own micro-batches'.
    Process 0 (and a single process) writes :data:`ROLLOUTS_FILE`."""
    return ROLLOUTS_FILE if rank == 0 else f"grpo_rollouts.rank{rank}.safetensors"


def rollouts_files(folder: Path) -> list[Path]:
    """Every process's rollouts file in checkpoint ``folder`` (:func:`rollouts_file`), process 0's first."""
    ranks = {int(m.group(1)): p for p in folder.glob("grpo_rollouts.rank*.safetensors")
             if (m := re.fullmatch(r"grpo_rollouts\.rank(\d+)\.safetensors", p.name))}
    own = [folder / ROLLOUTS_FILE] if (folder / ROLLOUTS_FILE).is_file() else []
    return own + [ranks[r] for r in sorted(ranks)]


Groups = list[tuple[list[int], list[list[int]]]]
"""A rollout's trained groups: ``(prompt ids, the ids of its kept completions)`` each, in training order."""


@dataclass
class Rollout:
    """A micro-batch's sampled completions, ready to train: ``groups`` (the kept ones), ``packed`` (their row, on the
    device: :meth:`GRPOObjective._pack`), ``advantages [k]`` of its ``k`` completions, ``ref`` and ``old``
    log-probabilities ``[k, T]`` (or None), and the metric sums of all its completions (kept or not)."""

    groups: Groups
    packed: PackedBatch
    advantages: torch.Tensor
    ref: torch.Tensor | None
    old: torch.Tensor | None
    metrics: dict[str, float]

    @property
    def num_sequences(self) -> int:
        return self.packed.num_examples


def _flat(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([t for ids in lists for t in ids], dtype=torch.long),
            torch.tensor([len(ids) for ids in lists], dtype=torch.long))


def _unflat(ids: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    flat, out, start = ids.tolist(), [], 0
    for n in lengths.tolist():
        out.append(flat[start:start + n])
        start += n
    return out


def save_rollouts(rollouts: dict[tuple[int, int], Rollout], path: Path) -> None:
    """Write ``rollouts`` (key ``(epoch, micro-batch)`` -> rollout) to ``path`` (module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for i, (key, r) in enumerate(sorted(rollouts.items())):
        entries.append({"key": list(key), "metrics": r.metrics, "ref": r.ref is not None, "old": r.old is not None})
        tensors[f"{i}.prompts"], tensors[f"{i}.prompt_lengths"] = _flat([p for p, _ in r.groups])
        tensors[f"{i}.completions"], tensors[f"{i}.completion_lengths"] = _flat([c for _, cs in r.groups for c in cs])
        tensors[f"{i}.group_sizes"] = torch.tensor([len(cs) for _, cs in r.groups], dtype=torch.long)
        tensors[f"{i}.advantages"] = r.advantages.detach().cpu().contiguous()
        for name in ("ref", "old"):
            value = getattr(r, name)
            if value is not None:
                tensors[f"{i}.{name}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"rollouts": json.dumps(entries)})


def load_rollouts(path: Path, device: torch.device | str,
                  pack: Callable[[Groups], PackedBatch]) -> dict[tuple[int, int], Rollout]:
    """The rollouts :func:`save_rollouts` wrote to ``path``, their groups packed again with ``pack`` and their
    tensors on ``device``."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        entries = json.loads((f.metadata() or {})["rollouts"])
    out: dict[tuple[int, int], Rollout] = {}
    for i, entry in enumerate(entries):
        prompts = _unflat(tensors[f"{i}.prompts"], tensors[f"{i}.prompt_lengths"])
        completions = _unflat(tensors[f"{i}.completions"], tensors[f"{i}.completion_lengths"])
        groups: Groups = []
        for prompt, size in zip(prompts, tensors[f"{i}.group_sizes"].tolist(), strict=True):
            groups.append((prompt, completions[:size]))
            completions = completions[size:]
        out[(int(entry["key"][0]), int(entry["key"][1]))] = Rollout(
            groups, pack(groups).to(device), tensors[f"{i}.advantages"].to(device),
            tensors[f"{i}.ref"].to(device) if entry["ref"] else None,
            tensors[f"{i}.old"].to(device) if entry["old"] else None,
            {k: float(v) for k, v in entry["metrics"].items()})
    return out
