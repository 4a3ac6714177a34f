"""Loading finished runs for generation and chat (``inference``), and serving many adapters over HTTP.

``inference``: one run for ``tuneforge generate`` / ``chat``. ``server``: ``tuneforge serve`` (OpenAI-compatible
API); ``engine``: continuous batching; ``adapters``: many adapters on one base, per row of a batch;
``protocol``, ``security``, ``metrics``: request shapes, keys and limits, Prometheus.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeConfig", "Server"]


def __getattr__(name: str) -> Any:      # the server pulls in FastAPI: import it only when asked for
    if name in __all__:
        from tuneforge.serving import server

        return getattr(server, name)
    raise AttributeError(name)
