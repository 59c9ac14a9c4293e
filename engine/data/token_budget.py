"""Token-budget micro-batches (``--use_dynamic_batch_size --max_tokens_per_gpu N``).

Long reasoning responses vary 10-100x in length: a fixed number of samples per micro-batch either
runs out of memory on the long ones or idles on the short ones. Here a step's samples are split
into micro-batches of at most ``N`` real tokens each, packed into one row, and balanced twice:

- over data-parallel ranks by tokens, every rank with the same number of micro-batches (so the
  ranks of a step join the same DDP and pipeline collectives, and Megatron's per-rank scaling of
  ``1 / num_microbatches`` is the same everywhere: the step's loss stays the fixed-batch loss, as
  every loss here is aggregated over the optimizer step, not per micro-batch);
- over the micro-batches of a rank (longest-first into the lightest), so pipeline stages and
  ranks wait on each other as little as possible.

Pure Python: the planner sees lengths only; the callers lay the micro-batches out.
"""
from __future__ import annotations

from dataclasses import dataclass

from parallel.options import option


@dataclass(kw_only=True)
class TokenBudgetConfig:
    """Micro-batches sized by tokens instead of samples."""

    use_dynamic_batch_size: bool = option(
        False, aliases=("use_dynamic_batch",),
        help="size each micro-batch by --max_tokens_per_gpu tokens instead of a fixed number of samples, packed into "
             "one row, with the samples balanced over data-parallel ranks by tokens (the step's loss is unchanged)")
    max_tokens_per_gpu: int | None = option(
        None, aliases=("train_max_tokens_per_gpu",),
        help="with --use_dynamic_batch_size, the most real tokens (prompt + response) in one micro-batch; a longer "
             "sample is an error")

    def __post_init__(self) -> None:
        if self.max_tokens_per_gpu is not None and self.max_tokens_per_gpu < 1:
            raise ValueError(f"--max_tokens_per_gpu must be >= 1, got {self.max_tokens_per_gpu}")
        if self.use_dynamic_batch_size and self.max_tokens_per_gpu is None:
            raise ValueError("--use_dynamic_batch_size needs --max_tokens_per_gpu N (the tokens of one micro-batch)")
        if self.max_tokens_per_gpu is not None and not self.use_dynamic_batch_size:
            raise ValueError("--max_tokens_per_gpu applies with --use_dynamic_batch_size: add it")

    @property
    def max_tokens(self) -> int | None:
        """The budget in effect (None: fixed micro-batches)."""
        return self.max_tokens_per_gpu if self.use_dynamic_batch_size else None


def check_fits(lengths: list[int], max_tokens: int, *, what: str = "sample", indices: list[int] | None = None) -> None:
    """A sample longer than the budget is an error naming both (``indices``: the samples' names, default
    their positions)."""
    for position, length in enumerate(lengths):
        if length > max_tokens:
            index = indices[position] if indices is not None else position
            raise ValueError(f"{what} {index} has {length} tokens, more than --max_tokens_per_gpu {max_tokens}: "
                             "raise --max_tokens_per_gpu or cut samples shorter")


def _longest_first(lengths: list[int], order: list[int], num_bins: int) -> tuple[list[list[int]], list[int]]:
    """``order`` (indices into ``lengths``, longest first) each into the lightest of ``num_bins`` bins."""
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    loads = [0] * num_bins
    for index in order:
        target = min(range(num_bins), key=lambda b: (loads[b], len(bins[b]), b))
        bins[target].append(index)
        loads[target] += lengths[index]
    return bins, loads


def balanced_microbatches(lengths: list[int], *, max_tokens: int, num_ranks: int,
                          equal_counts: bool = True) -> list[list[list[int]]]:
    """Per data-parallel rank, its micro-batches as lists of sample indices (ascending within each).

    Every micro-batch holds at most ``max_tokens`` tokens and at least one sample. ``equal_counts``
    (training): every rank gets the same number of micro-batches, and raises when the samples are
    too few for that; otherwise (forward only) a rank may get fewer, or none. Deterministic: every
    rank computes the same plan from the same lengths, with no communication."""
    check_fits(lengths, max_tokens)
    num = len(lengths)
    if equal_counts and num < num_ranks:
        raise ValueError(f"{num} samples cannot give each of {num_ranks} data-parallel ranks a micro-batch")
    if num == 0:
        return [[] for _ in range(num_ranks)]
    order = sorted(range(num), key=lambda i: (-lengths[i], i))
    per_rank = max(1, -(-sum(lengths) // (num_ranks * max_tokens)))
    while True:
        num_bins = num_ranks * per_rank
        if num_bins > num and equal_counts:
            raise ValueError(
                f"--use_dynamic_batch_size: {num} samples of {sum(lengths)} tokens need {per_rank} micro-batches of at "
                f"most --max_tokens_per_gpu {max_tokens} tokens on each of {num_ranks} data-parallel ranks (the ranks "
                "run the same number), more micro-batches than samples: raise --max_tokens_per_gpu or the batch size")
        bins, loads = _longest_first(lengths, order, min(num_bins, num))
        if max(loads) <= max_tokens:
            break
        per_rank += 1
    return _deal_to_ranks(bins, loads, num_ranks=num_ranks, per_rank=per_rank)


def _deal_to_ranks(bins: list[list[int]], loads: list[int], *, num_ranks: int, per_rank: int
                   ) -> list[list[list[int]]]:
    """Heaviest micro-batch first, each to the rank with the fewest tokens that has room for one more."""
    ranks: list[list[list[int]]] = [[] for _ in range(num_ranks)]
    tokens = [0] * num_ranks
    for b in sorted(range(len(bins)), key=lambda b: (-loads[b], b)):
        target = min((r for r in range(num_ranks) if len(ranks[r]) < per_rank), key=lambda r: (tokens[r], r))
        ranks[target].append(sorted(bins[b]))
        tokens[target] += loads[b]
    return ranks
