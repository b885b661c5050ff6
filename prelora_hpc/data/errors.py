"""The one exception type of the data package."""

from __future__ import annotations


class DataError(ValueError):
    """Image data is missing, malformed or inconsistent.

    The message is one line and names the file (and, where there is one, the
    split and the index), so that a batch job's log says what to fix.
    """
