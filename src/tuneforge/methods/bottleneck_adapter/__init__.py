"""Bottleneck adapters (Houlsby et al. 2019): our own method, in peft's three-file shape.

* ``config.py``: :class:`BottleneckAdapterConfig`, what is saved as ``adapter_config.json``.
* ``layer.py``: :class:`BottleneckAdapterLayer`, one adapter wrapped around one sub-layer.
* ``model.py``: :class:`BottleneckAdapterModel`, injects the layers, saves and loads them.
"""

from tuneforge.methods.bottleneck_adapter.config import ADAPTER_TYPE, BottleneckAdapterConfig
from tuneforge.methods.bottleneck_adapter.layer import BottleneckAdapterLayer
from tuneforge.methods.bottleneck_adapter.model import BottleneckAdapterModel, NotMergeableError

__all__ = ["ADAPTER_TYPE", "BottleneckAdapterConfig", "BottleneckAdapterLayer", "BottleneckAdapterModel",
           "NotMergeableError"]
