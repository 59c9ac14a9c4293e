"""Deterministic data-parallel sharding of a dataset into micro-batches, resumable by index.

Every epoch has one global order of sample indices (a permutation seeded by ``seed + epoch``,
the same on every rank). It is consumed ``micro_batch_size x dp_size`` samples at a time, and
data-parallel rank ``r`` takes the ``r``-th ``micro_batch_size`` slice of each such step. The
ranks' shares are disjoint and cover every step; a final step too short for every rank is
dropped, so all ranks run the same number of micro-batches.

``start_index`` counts samples already consumed in this epoch over all ranks (what a
checkpoint stores): resuming from it continues the very same global sequence, even under a
different ``dp_size``.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def shard_indices(num_samples: int, *, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int, epoch: int,
                  start_index: int = 0, shuffle: bool = True) -> Iterator[list[int]]:
    """This rank's micro-batches of sample indices, from global position ``start_index`` on."""
    _check(num_samples, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, start_index=start_index)
    if shuffle:
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    else:
        order = list(range(num_samples))
    step = micro_batch_size * dp_size
    # A generator expression, not a generator function: the checks above run at the call.
    return (
        order[begin + dp_rank * micro_batch_size : begin + (dp_rank + 1) * micro_batch_size]
        for begin in range(start_index, num_samples - step + 1, step)
    )


def iterate_batches(dataset: Sequence, *, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int, epoch: int,
                    start_index: int = 0, shuffle: bool = True) -> Iterator[list]:
    """This rank's micro-batches of samples (lists of ``dataset[i]``); see ``shard_indices``."""
    batches = shard_indices(len(dataset), micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                            seed=seed, epoch=epoch, start_index=start_index, shuffle=shuffle)
    return ([dataset[i] for i in indices] for indices in batches)


def _check(num_samples: int, *, micro_batch_size: int, dp_rank: int, dp_size: int, start_index: int) -> None:
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, dp_size), got dp_rank={dp_rank}, dp_size={dp_size}")
    if not 0 <= start_index <= num_samples:
        raise ValueError(f"start_index (samples consumed) must be in [0, {num_samples}], got {start_index}")
