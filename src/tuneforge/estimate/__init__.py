"""Training memory estimates before any model loads: ``tuneforge estimate`` and its Python API."""

from tuneforge.estimate.memory import MemoryEstimate, estimate_memory, seeds_table
from tuneforge.estimate.shapes import NAMED_SHAPES, ModelShape, resolve_shape

__all__ = ["MemoryEstimate", "ModelShape", "NAMED_SHAPES", "estimate_memory", "resolve_shape", "seeds_table"]
