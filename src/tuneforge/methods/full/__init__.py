"""Full fine-tuning: ``config.py`` (the ``full:`` section), ``model.py`` (unfreeze, optionally freeze
embeddings or layers). Registered as ``method: full``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from tuneforge.methods.full.config import FullConfig
from tuneforge.methods.full.memory import full_memory
from tuneforge.methods.full.model import apply_full, load_full
from tuneforge.methods.registry import Method, register_method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from tuneforge.config import RunConfig

__all__ = ["FullConfig", "apply_full"]


def _apply(model: PreTrainedModel, config: RunConfig, tokenizer: Any = None) -> nn.Module:
    return apply_full(model, config.full)


register_method(Method(
    name="full", summary="all weights (minus frozen ones)",
    memory=full_memory, engines=frozenset({"single", "ddp", "fsdp2"}),
    settings={"full": FullConfig}, apply=_apply,
    load_trained=load_full, saved_types=("full",), is_full_model=True,
    not_mergeable_reason="the run saved complete weights: there is no adapter to merge; use the run's model folder",
    # the best held-out tickets of 5e-6 .. 2e-4 (benchmarks/full_ft_lr_sweep.py); not measured for long runs
    learning_rate=1e-4, learning_rate_source="benchmarks/results/full_ft_lr_sweep_cpu_2026-12-03.txt",
))
