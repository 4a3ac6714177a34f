"""Settings of ``method: prompt``: the run config's ``prompt:`` section."""

from __future__ import annotations

from pydantic import Field

from tuneforge.schema import Settings


class PromptConfig(Settings):
    num_virtual_tokens: int = Field(20, ge=1)
    init_text: str | None = None
