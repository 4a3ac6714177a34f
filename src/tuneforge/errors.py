"""Errors every stage raises for bad input: one line naming the file, key or field and what to do.

They live below every stage (data, methods, training, evaluation, export, serving and the run config all
raise them) so that none has to import another to say what is wrong. The CLI turns each into one line and
exit status 2.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the key and what to do."""


class RewardError(ConfigError):
    """A GRPO reward function that cannot be imported or set up, or returned unusable scores (one line naming it)."""
