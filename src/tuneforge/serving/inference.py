"""``tuneforge generate`` / ``chat``: a run directory (or package) loaded with its trained method, generating with
the chat template of training.

Loading a run is :mod:`tuneforge.runs.loading`'s (every stage loads runs from there); the names stay importable
from here: ``tuneforge.serving.inference.load_run``, ``load_base``, ``LoadedModel``.
"""

from __future__ import annotations

from tuneforge.runs.loading import LoadedModel, load_base, load_run

__all__ = ["LoadedModel", "load_base", "load_run"]
