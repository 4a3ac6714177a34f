"""The errors of data that cannot be used at all (as opposed to single records, which become rejects).

Both are one-line messages naming the file (and line) and what to do; the CLI prints them as ``error: ...``.
"""

from __future__ import annotations


class DataError(ValueError):
    """Data a run cannot use: no usable record, an example over ``max_length`` with ``too_long: error``, ..."""


class DataFileError(DataError):
    """A data file that cannot be read at all (missing, unknown type, a ``.json`` file that is not one array)."""
