"""Per-sequence sums of per-token values, exact under context parallelism and packing.

Sequence-level losses (RM, DPO, KTO; GSPO-like policy losses) are functions of whole sequences,
but under context parallelism each CP rank holds only its zigzag share of every sequence, and a
packed row holds several sequences. ``sequence_sums`` gives every CP rank the full per-sequence
sum, differentiably; a loss built from it must then be weighted by ``context_parallel_share`` on
each rank, because Megatron sums the CP ranks' gradients (and the metrics add up over them).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.context_parallel import all_reduce_sum


def context_parallel_share(cp_group) -> float:
    """The part of a sequence-level loss each CP rank contributes: ``1 / cp_size``."""
    return 1.0 / dist.get_world_size(group=cp_group)


def local_sequence_sums(per_token: torch.Tensor, batch: dict) -> torch.Tensor:
    """``[..., rows, s]`` per-token values summed per sequence, on this rank's tokens only: per
    row of a padded batch; with ``sequence_index`` (long ``[rows, s]``, which sequence a token is
    of) and ``num_sequences``, per index (tokens indexed ``num_sequences`` or more are dropped)."""
    if "sequence_index" not in batch:
        return per_token.sum(-1)
    index = batch["sequence_index"].to(per_token.device)
    count = int(batch["num_sequences"])
    lead = per_token.shape[:-2]
    index = index.reshape(-1).clamp(max=count)  # the last bucket: padding
    sums = per_token.new_zeros((*lead, count + 1))
    return sums.scatter_add(-1, index.expand(*lead, -1), per_token.reshape(*lead, -1))[..., :count]


def sequence_sums(per_token: torch.Tensor, batch: dict, *, cp_group) -> torch.Tensor:
    """Per-sequence sums over the whole sequence on every CP rank, keeping their gradient."""
    return all_reduce_sum(local_sequence_sums(per_token, batch), group=cp_group)


def per_token(per_sequence: torch.Tensor, batch: dict, like: torch.Tensor) -> torch.Tensor:
    """Each token's value of its sequence (``per_sequence``: ``[num_sequences]`` as ``sequence_sums``
    gives), shaped like the per-token ``like``; padding tokens get some sequence's value (mask them)."""
    if "sequence_index" not in batch:
        return per_sequence[:, None].expand_as(like)
    index = batch["sequence_index"].to(per_sequence.device).clamp(max=max(int(batch["num_sequences"]) - 1, 0))
    return per_sequence[index.reshape(-1)].reshape(like.shape)


def sequence_means(per_token_values: torch.Tensor, mask: torch.Tensor, batch: dict, *, cp_group
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(means, counts)``, ``[num_sequences]`` each: the mean of ``per_token_values`` over each whole
    sequence's ``mask``ed tokens (all CP ranks' shares; 0 for a sequence without any) and their
    number; no gradient. ``per_token`` spreads the means back over the tokens."""
    with torch.no_grad():
        stacked = torch.stack([per_token_values * mask, mask.to(per_token_values.dtype)])
        local = local_sequence_sums(stacked, batch)
        sums = local if cp_group is None else all_reduce_sum(local, group=cp_group)
        return sums[0] / sums[1].clamp(min=1), sums[1]
