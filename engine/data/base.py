"""What every tokenized dataset shares: build one sample per row up front, fail or skip bad rows.

Samples are built eagerly so that a malformed row stops the job before training starts (or
is counted when ``--skip_bad_rows``), and ``len()`` is the number of usable samples. Token
lists are stored as numpy arrays (4 bytes a token instead of a Python int object) and handed
out as lists.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from engine.data.errors import DataError, DataWarning
from engine.data.rows import as_rows


class RowDataset(Sequence):
    """Base class: subclasses set their state, then call ``self._build(rows, skip_bad_rows=...)``.

    ``build_sample(row)`` returns the sample dict, None for a row that is well-formed but too
    long (dropped and counted in ``num_too_long``), or raises ``DataError`` for a bad row
    (counted in ``num_skipped`` when skipping).
    """

    array_fields: tuple[str, ...] = ()  # int-list fields stored as numpy arrays
    too_long_flag = "--max_len"

    def build_sample(self, row: dict) -> dict | None:
        raise NotImplementedError

    def _build(self, rows, *, skip_bad_rows: bool) -> None:
        rows = as_rows(rows)
        self._samples: list[dict] = []
        # Lines that were not valid JSON were skipped while loading (--skip_bad_rows): counted here too.
        self.num_skipped = rows.num_unparsable
        self.num_too_long = 0
        first_error = None
        for index in range(len(rows)):
            try:
                sample = self.build_sample(rows[index])
            except DataError as error:
                located = error.at(*rows.origin(index))
                if not skip_bad_rows:
                    raise located from None
                self.num_skipped += 1
                first_error = first_error or located
                continue
            if sample is None:
                self.num_too_long += 1
            else:
                self._samples.append(self._compact(sample))
        self._warn_dropped(len(rows) + rows.num_unparsable, first_error)

    def _warn_dropped(self, num_rows: int, first_error: DataError | None) -> None:
        name = type(self).__name__
        if self.num_skipped:
            warnings.warn(
                f"{name}: skipped {self.num_skipped} of {num_rows} rows as malformed (--skip_bad_rows); "
                f"first: {first_error or 'a line that is not valid JSON (named above)'}", DataWarning, stacklevel=3,
            )
        if self.num_too_long:
            warnings.warn(
                f"{name}: dropped {self.num_too_long} of {num_rows} rows whose prompt does not fit "
                f"{self.too_long_flag}", DataWarning, stacklevel=3,
            )

    def _compact(self, sample: dict) -> dict:
        return {k: np.asarray(v, dtype=np.int32) if k in self.array_fields else v for k, v in sample.items()}

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict:
        sample = self._samples[index]
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in sample.items()}
