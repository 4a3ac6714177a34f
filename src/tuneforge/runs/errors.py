"""What goes wrong reading a run directory or a package: each message is one line naming the file and the fix."""

from __future__ import annotations


class NotARunError(ValueError):
    """The folder is not a finished tuneforge run (or not a package), or one of its records cannot be read."""


class NewerSchemaError(NotARunError):
    """A record (``run.json``, ``tuneforge.json``, ``eval/report.json``) was written by a newer tuneforge."""
