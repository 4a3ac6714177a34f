"""The errors of data that cannot be used at all (as opposed to single records, which become rejects:
:class:`RecordError`).

:class:`DataError` and :class:`DataFileError` are one-line messages naming the file (and line) and what to do;
the CLI prints them as ``error: ...``.
"""

from __future__ import annotations


class RecordError(ValueError):
    """A record that does not fit its format; the message says what is wrong, ``check`` names the problem
    (``missing_field``, ``wrong_type``, ``unknown_role``, ``turn_order``, ``empty_answer``, ...: the names
    curation uses, see :data:`tuneforge.data.curation.config.CHECKS`). The record becomes a reject."""

    def __init__(self, message: str, check: str = "invalid_record"):
        super().__init__(message)
        self.check = check


class DataError(ValueError):
    """Data a run cannot use: no usable record, an example over ``max_length`` with ``too_long: error``, ..."""


class DataFileError(DataError):
    """A data file that cannot be read at all (missing, unknown type, a ``.json`` file that is not one array)."""
