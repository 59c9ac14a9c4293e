"""Load-balanced ("zigzag") sequence layout for context parallelism.

With causal attention the last tokens of a sequence do the most work, so a plain contiguous
split would leave CP rank C-1 with most of the FLOPs. Instead the sequence (length ``S``,
divisible by ``2*C``) is cut into ``2*C`` equal chunks and CP rank ``r`` holds chunks ``r`` and
``2*C-1-r``, concatenated in that order::

    C=2, S=8:  chunks [0 1 | 2 3 | 4 5 | 6 7]   rank 0 -> [0 1 6 7]   rank 1 -> [2 3 4 5]

This is exactly the layout megatron-core 0.16.1 assumes:

* padded batches: ``RotaryEmbedding.forward`` builds the embedding for the global length and
  keeps ``get_pos_emb_on_this_cp_rank(emb, 0, cp_group)``, i.e. chunks ``[r, 2C-1-r]`` of
  ``2C`` (``rope_utils.py``);
* packed (``thd``) batches: ``_apply_rotary_pos_emb_thd`` receives the GLOBAL padded
  ``cu_seqlens`` (``PackedSeqParams.cu_seqlens_q_padded`` when set), divides each sample's
  length by ``C`` and takes chunks ``r`` and ``2C-1-r`` of EACH sample
  (``_get_thd_freqs_on_this_cp_rank``). So every sample is padded to a multiple of ``2C`` and
  split on its own; the local pieces are concatenated in sample order.

Nothing here knows about models: only tensors, dims and process groups passed in.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _check_divisible(length: int, cp_size: int, what: str) -> None:
    if length % (2 * cp_size) != 0:
        raise ValueError(
            f"{what} ({length}) must be divisible by 2 * context_parallel_size ({2 * cp_size}) "
            "for the zigzag layout; pad it first (see pad_packed_for_cp)"
        )


def zigzag_split(tensor: torch.Tensor, *, dim: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Keep CP rank ``cp_rank``'s zigzag shard of ``tensor`` along ``dim``: chunks ``r`` and ``2C-1-r``.

    ``tensor.shape[dim]`` must be divisible by ``2 * cp_size``. Returns a tensor of length
    ``shape[dim] / cp_size`` along ``dim`` (``tensor`` itself when ``cp_size == 1``); differentiable.
    """
    if cp_size == 1:
        return tensor
    _check_divisible(tensor.shape[dim], cp_size, f"sequence length along dim {dim}")
    chunks = tensor.chunk(2 * cp_size, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=dim)


def zigzag_unsplit(pieces: list[torch.Tensor], *, dim: int) -> torch.Tensor:
    """Inverse of :func:`zigzag_split`: ``pieces[r]`` is rank ``r``'s shard; returns the full tensor."""
    cp_size = len(pieces)
    if cp_size == 1:
        return pieces[0]
    halves = [piece.chunk(2, dim=dim) for piece in pieces]
    # Chunk j < C is the first half of rank j; chunk 2C-1-j the second half of rank j.
    ordered = [halves[j][0] for j in range(cp_size)] + [halves[j][1] for j in reversed(range(cp_size))]
    return torch.cat(ordered, dim=dim)


def zigzag_gather(local: torch.Tensor, *, dim: int, cp_group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather the zigzag shards of ``cp_group`` and return the tensor in global sequence order.

    Differentiable: each rank's shard receives the sum over ranks of the gradient of its slice
    (every rank may use the whole gathered tensor in its loss).
    """
    if dist.get_world_size(group=cp_group) == 1:
        return local
    return _ZigzagGather.apply(local, dim, cp_group)


class _ZigzagGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, dim, cp_group):
        ctx.dim, ctx.cp_group = dim, cp_group
        pieces = [torch.empty_like(local) for _ in range(dist.get_world_size(group=cp_group))]
        dist.all_gather(pieces, local.contiguous(), group=cp_group)
        return zigzag_unsplit(pieces, dim=dim)

    @staticmethod
    def backward(ctx, grad_full):
        # all_reduce + local slice rather than reduce_scatter: gloo has no reduce_scatter.
        grad_full = grad_full.contiguous()
        dist.all_reduce(grad_full, group=ctx.cp_group)
        grad_local = zigzag_split(
            grad_full,
            dim=ctx.dim,
            cp_rank=dist.get_rank(group=ctx.cp_group),
            cp_size=dist.get_world_size(group=ctx.cp_group),
        )
        return grad_local, None, None


def all_reduce_sum(tensor: torch.Tensor, *, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable sum over ``group``: the backward all-reduces the gradients too.

    For sequence-level losses under context parallelism (a sequence's log-prob is the sum of
    every CP rank's share): each rank then holds the full value, computes the whole loss from
    it and must contribute ``1 / cp_size`` of that loss, as with ``zigzag_gather``.
    """
    if dist.get_world_size(group=group) == 1:
        return tensor
    return _AllReduceSum.apply(tensor, group)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone().contiguous()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone().contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def zigzag_positions(seq_len: int, cp_rank: int, cp_size: int, *, device=None) -> torch.Tensor:
    """Global token positions (``int64``, length ``seq_len / cp_size``) held by CP rank ``cp_rank``."""
    _check_divisible(seq_len, cp_size, "seq_len")
    return zigzag_split(torch.arange(seq_len, device=device), dim=0, cp_rank=cp_rank, cp_size=cp_size)


def pad_packed_for_cp(cu_seqlens: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Global ``cu_seqlens`` with every sample's length rounded up to a multiple of ``2 * cp_size``
    (unchanged when ``cp_size == 1``).

    This is what Megatron expects in ``PackedSeqParams.cu_seqlens_q_padded`` (and what its
    ``thd`` rotary path divides by ``cp_size``). Padding goes at the end of each sample, so
    under causal attention no real token ever sees a pad token.
    """
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    multiple = 2 * cp_size if cp_size > 1 else 1  # without CP nothing is split, so nothing to pad
    padded = (lengths + multiple - 1) // multiple * multiple
    return torch.cat([cu_seqlens.new_zeros(1), torch.cumsum(padded, 0).to(cu_seqlens.dtype)])


def local_cu_seqlens(cu_seqlens_padded: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Per-rank ``cu_seqlens`` of a packed batch whose global padded ``cu_seqlens`` are given."""
    if cp_size == 1:
        return cu_seqlens_padded
    lengths = cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]
    if bool(((lengths % (2 * cp_size)) != 0).any()):
        raise ValueError(
            f"every sample length must be a multiple of 2 * context_parallel_size ({2 * cp_size}); "
            "pad the samples first (see pad_packed_for_cp)"
        )
    return cu_seqlens_padded // cp_size


def zigzag_split_packed(
    tensor: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    dim: int,
    cp_rank: int,
    cp_size: int,
    pad_value: float = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zigzag-split each sample of a packed tensor on its own; return ``(local, local_cu_seqlens)``.

    ``tensor`` holds samples back to back along ``dim`` with boundaries ``cu_seqlens`` (real,
    possibly odd lengths). Each sample is padded at its end with ``pad_value`` to a multiple of
    ``2 * cp_size`` (see :func:`pad_packed_for_cp`), split into ``2 * cp_size`` chunks, and this
    rank keeps chunks ``r`` and ``2C-1-r``. ``local_cu_seqlens`` are the boundaries of the local
    pieces (``pad_packed_for_cp(cu_seqlens, cp_size) // cp_size``).
    """
    bounds = cu_seqlens.tolist()
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        sample = tensor.narrow(dim, start, end - start)
        pad = -(end - start) % (2 * cp_size) if cp_size > 1 else 0
        if pad:
            pad_shape = list(sample.shape)
            pad_shape[dim] = pad
            sample = torch.cat([sample, sample.new_full(pad_shape, pad_value)], dim=dim)
        pieces.append(zigzag_split(sample, dim=dim, cp_rank=cp_rank, cp_size=cp_size))
    local = torch.cat(pieces, dim=dim) if pieces else tensor.narrow(dim, 0, 0)
    return local, pad_packed_for_cp(cu_seqlens, cp_size) // cp_size


@torch.no_grad()
def zigzag_gather_packed(local: torch.Tensor, cu_seqlens: torch.Tensor, *, dim: int,
                         cp_group: dist.ProcessGroup) -> torch.Tensor:
    """Inverse of :func:`zigzag_split_packed` over ``cp_group``: every rank's local pieces of a
    packed tensor, gathered and returned as the global packed tensor with the real sample
    lengths of ``cu_seqlens`` (the per-sample CP padding dropped). Forward only (scoring)."""
    cp_size = dist.get_world_size(group=cp_group)
    if cp_size == 1:
        return local
    pieces = [torch.empty_like(local) for _ in range(cp_size)]
    dist.all_gather(pieces, local.contiguous(), group=cp_group)
    local_bounds = (pad_packed_for_cp(cu_seqlens.to(torch.int64), cp_size) // cp_size).tolist()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    samples = []
    for index, length in enumerate(lengths):
        start, stop = local_bounds[index], local_bounds[index + 1]
        shards = [piece.narrow(dim, start, stop - start) for piece in pieces]
        samples.append(zigzag_unsplit(shards, dim=dim).narrow(dim, 0, length))
    return torch.cat(samples, dim=dim)
