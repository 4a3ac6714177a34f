"""Training memory estimates before any model loads: ``tuneforge estimate`` and its Python API.

The names below load on first use (PEP 562), so that ``tuneforge --help`` and the commands that fail on their
input do not import every method (and with them peft, bitsandbytes and torch) before printing a line.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuneforge.estimate.memory import MemoryEstimate, estimate_memory, seeds_table
    from tuneforge.estimate.shapes import NAMED_SHAPES, ModelShape, resolve_shape

__all__ = ["MemoryEstimate", "ModelShape", "NAMED_SHAPES", "estimate_memory", "resolve_shape", "seeds_table"]

_WHERE = {"MemoryEstimate": "memory", "estimate_memory": "memory", "seeds_table": "memory",
          "NAMED_SHAPES": "shapes", "ModelShape": "shapes", "resolve_shape": "shapes"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'tuneforge.estimate' has no attribute {name!r}")
    return getattr(import_module(f"tuneforge.estimate.{_WHERE[name]}"), name)
