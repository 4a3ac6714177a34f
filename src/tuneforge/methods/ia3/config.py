"""Settings of ``method: ia3``: the run config's ``ia3:`` section."""

from __future__ import annotations

from tuneforge.schema import Settings


class IA3Config(Settings):
    target_modules: list[str] | None = None       # default: k_proj, v_proj, down_proj
    feedforward_modules: list[str] | None = None  # default: down_proj
