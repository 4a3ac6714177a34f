"""Score the tuned columns with the adapter merged into the weights in memory, then put them back.

A LoRA / IA3 model computes ``W x + (alpha/r) B A x`` through extra modules at every linear layer; merged,
it is one matmul per layer (peft's ``merge_adapter``: ``W <- W + delta``), which makes generation and
MMLU scoring faster. Only for methods the registry marks mergeable whose merge can be undone exactly
(``Method.merge_reversible``; not QLoRA: merging into 4-bit weights is lossy). Merging is checked, not
trusted: the logits of ``probe`` prompts before and after must agree within ``tolerance`` (relative to their
scale), else the adapter is unmerged and the unmerged model is used. On leaving, ``unmerge_adapter`` subtracts the same
deltas (float rounding of about 1e-7 relative: the base columns that follow see the same argmax).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)


def can_merge(model: torch.nn.Module, method: str) -> bool:
    from tuneforge.methods.registry import get_method

    record = get_method(method)
    return (record.mergeable and record.merge_reversible and hasattr(model, "merge_adapter")
            and hasattr(model, "unmerge_adapter"))


@contextlib.contextmanager
def merged_for_scoring(model: torch.nn.Module, method: str, probe: torch.Tensor | None,
                       tolerance: float = 1e-4, record: dict | None = None) -> Iterator[bool]:
    """Within the block ``model`` has its adapter merged when that is possible and checked equal; yields
    whether it is. ``probe``: ``[B, T]`` token ids to compare logits on. ``record`` gets ``max_abs_diff``."""
    if probe is None or not can_merge(model, method):
        yield False
        return
    model.eval()
    with torch.no_grad():
        before = model(input_ids=probe).logits.float()
        model.merge_adapter()
        after = model(input_ids=probe).logits.float()
    diff = float((before - after).abs().max())
    ok = diff <= tolerance * max(1.0, float(before.abs().max()))
    if record is not None:
        record.update({"merged": ok, "max_abs_diff": diff})
    if not ok:
        model.unmerge_adapter()
        log.warning("merged adapter differs from the unmerged one by %.2e: scoring unmerged", diff)
        yield False
        return
    try:
        yield True
    finally:
        model.unmerge_adapter()
