"""``Rows``: a read-only sequence of raw dataset rows that remembers where each row came from.

Mixing, capping and concatenating only rearrange an index of (part, row) pairs; the row data
stays in the loaded tables (memory-mapped Arrow for HF datasets). So an error about a row of
a mixture can still name the file it was read from and its row number there.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class Rows(Sequence):
    """Rows of one or more named tables, in a chosen order; ``rows[i]`` is a dict.

    ``parts`` are ``(name, table)`` pairs, where a table is anything indexable by row number
    that returns a dict (a ``datasets.Dataset``, a list of dicts).
    """

    def __init__(self, parts: list[tuple[str, Any]], part_ids: np.ndarray, row_ids: np.ndarray):
        assert len(part_ids) == len(row_ids)
        self.parts = parts
        self.part_ids = np.asarray(part_ids, dtype=np.int64)
        self.row_ids = np.asarray(row_ids, dtype=np.int64)
        # Lines of the sources that were not rows at all (not valid JSON, skipped by --skip_bad_rows).
        self.num_unparsable = 0

    @classmethod
    def from_table(cls, name: str, table: Any) -> "Rows":
        """All rows of one table, in order."""
        num_rows = len(table)
        return cls([(name, table)], np.zeros(num_rows, dtype=np.int64), np.arange(num_rows))

    @classmethod
    def from_list(cls, rows: list[dict], name: str = "<memory>") -> "Rows":
        """In-memory rows (tests, generated data), reported under ``name``."""
        return cls.from_table(name, rows)

    @classmethod
    def concat(cls, pieces: Sequence["Rows"]) -> "Rows":
        """The rows of every piece, one piece after the other."""
        parts, part_ids, row_ids = [], [], []
        for piece in pieces:
            part_ids.append(piece.part_ids + len(parts))
            row_ids.append(piece.row_ids)
            parts.extend(piece.parts)
        if not parts:
            return cls([], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        joined = cls(parts, np.concatenate(part_ids), np.concatenate(row_ids))
        joined.num_unparsable = sum(piece.num_unparsable for piece in pieces)
        return joined

    def take(self, indices) -> "Rows":
        """The rows at ``indices`` (repeats allowed), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        taken = Rows(self.parts, self.part_ids[indices], self.row_ids[indices])
        taken.num_unparsable = self.num_unparsable
        return taken

    def head(self, count: int | None) -> "Rows":
        """The first ``count`` rows (all when ``count`` is None)."""
        return self if count is None or count >= len(self) else self.take(np.arange(count))

    def origin(self, index: int) -> tuple[str, int]:
        """``(source name, row number in that source)`` of row ``index``."""
        return self.parts[self.part_ids[index]][0], int(self.row_ids[index])

    def __len__(self) -> int:
        return len(self.row_ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        table = self.parts[self.part_ids[index]][1]
        return table[int(self.row_ids[index])]

    def __repr__(self) -> str:
        names = ", ".join(name for name, _ in self.parts[:3]) + (", ..." if len(self.parts) > 3 else "")
        return f"Rows({len(self)} rows from {names})"


def as_rows(rows) -> Rows:
    """``rows`` as ``Rows`` (a plain list of dicts or a ``datasets.Dataset`` becomes one unnamed part)."""
    return rows if isinstance(rows, Rows) else Rows.from_table("<memory>", rows)
