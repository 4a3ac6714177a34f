"""The base of every config section: unknown keys are errors, assignments are validated.

The run config (:mod:`tuneforge.config`) and each method's settings (``methods/<method>/config.py``)
derive from :class:`Settings`, so a typo in any section fails at load time with the closest valid key.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
