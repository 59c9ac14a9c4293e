"""Architecture-free resharding: shard ranges, gathering shards back, fused parts.

A *fused* tensor stacks ``num_parts`` logical tensors along ``dim`` (e.g. ``[gate; up]``) and is
sharded part by part, so rank r holds ``[part0_r; part1_r; ...]`` -- not a contiguous slice of
the full fused tensor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def shard_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """The [start, stop) of ``rank``'s even shard of a dimension of length ``size``."""
    if size % world_size:
        raise ValueError(f"dimension of size {size} does not split evenly over {world_size} ranks")
    step = size // world_size
    return rank * step, (rank + 1) * step


def all_gather_shards(local: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's shard of ``local`` over ``group``, in group-rank order."""
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return [local]
    local = local.contiguous()
    shards = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(shards, local, group=group)
    return shards


def merge_fused_shards(shards: list[torch.Tensor], *, dim: int, num_parts: int) -> torch.Tensor:
    """A fused tensor from every rank's fused shard: ``[p0_0; p1_0], [p0_1; p1_1] -> [p0; p1]``."""
    per_rank = [s.chunk(num_parts, dim=dim) for s in shards]
    return torch.cat([torch.cat([r[i] for r in per_rank], dim=dim) for i in range(num_parts)], dim=dim)
