"""Settings of ``method: full``: the run config's ``full:`` section."""

from __future__ import annotations

from tuneforge.schema import Settings


class FullConfig(Settings):
    freeze_embeddings: bool = False
    freeze_layers: list[int] = []
