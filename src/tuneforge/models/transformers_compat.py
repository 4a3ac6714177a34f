"""Differences between the transformers releases we support, answered in one place.

transformers 5.24 renamed the KV-cache argument of every model's ``forward`` and of ``generate`` from
``past_key_values`` to ``cache`` (the old name is deprecated until 5.40 and, when both are given, the old
one is ignored). Code that hands a cache to a model asks :func:`cache_argument` for the name.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def _cache_argument_of(forward_type: type) -> str:
    params = inspect.signature(forward_type.forward).parameters  # type: ignore[attr-defined]
    return "cache" if "cache" in params else "past_key_values"


def cache_argument(model: torch.nn.Module) -> str:
    """``"cache"`` (transformers >= 5.24) or ``"past_key_values"`` (earlier): the KV-cache keyword of ``model``."""
    return _cache_argument_of(type(model))
