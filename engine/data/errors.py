"""The data pipeline's user-facing errors and warnings.

Row-level code raises ``DataError(message, key=...)`` without knowing where the row came from;
the dataset that iterates the rows adds the place with :meth:`DataError.at`, so every message
the user sees names the file, the row (0-based index within that file) and the key.
"""
from __future__ import annotations


class DataError(ValueError):
    """A malformed or unreadable piece of data, located by ``source`` (file), ``row`` and ``key``."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None, key: str | None = None):
        self.message = message
        self.source = source
        self.row = row
        self.key = key
        super().__init__(str(self))

    def at(self, source: str, row: int) -> "DataError":
        """The same error, located at ``row`` of ``source``."""
        return DataError(self.message, source=source, row=row, key=self.key)

    def __str__(self) -> str:
        where = [part for part in (self.source, None if self.row is None else f"row {self.row}") if part]
        if self.key is not None:
            where.append(f"key {self.key!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class DataWarning(UserWarning):
    """Rows were dropped (skipped as malformed, or too long for ``--max_len`` / ``--prompt_max_len``)."""
