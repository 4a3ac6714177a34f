"""What chains the stages, on top of them: :func:`train_and_evaluate` (``tuneforge train``) and
:func:`run_pipeline` (``tuneforge pipeline``: curate -> train -> evaluate -> gates -> package -> export -> serve).

- ``compose.py``: :func:`train_and_evaluate`, train then (``eval.after_training``) evaluate;
- ``runner.py``: :func:`run_pipeline`, the stages in order with skipping, ``--from``/``--until``/``--force`` and
  the stop at a failed gate;
- ``stages.py``: each stage's inputs, outputs and call into its stage's API;
- ``gates.py``: the gates; ``hashing.py``: the hashes recorded; ``summary.py``: the summary and its table;
- ``commands.py``: ``tuneforge pipeline``'s argparse layer.

The stages stand side by side (training never imports evaluation); this package is allowed to import them all.
"""

from __future__ import annotations

from typing import Any

from tuneforge.pipeline.errors import GateFailed, StageFailed

_LAZY = {"train_and_evaluate": "compose", "run_pipeline": "runner", "PipelineResult": "runner"}

__all__ = ["GateFailed", "PipelineResult", "StageFailed", "run_pipeline", "train_and_evaluate"]


def __getattr__(name: str) -> Any:      # the stages pull in torch: import them only when asked for (the CLI's parser)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"tuneforge.pipeline.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tuneforge.pipeline' has no attribute {name!r}")
