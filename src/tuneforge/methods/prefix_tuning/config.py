"""Settings of ``method: prefix``: the run config's ``prefix:`` section."""

from __future__ import annotations

from pydantic import Field

from tuneforge.schema import Settings


class PrefixConfig(Settings):
    num_virtual_tokens: int = Field(20, ge=1)
    reparameterize: bool = False
    encoder_hidden_size: int = Field(512, ge=1)
