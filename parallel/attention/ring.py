"""Ring attention over a context-parallel group, for the zigzag layout of ``parallel.context_parallel``.

Each CP rank holds a zigzag shard of q/k/v: chunks ``r`` and ``2C-1-r`` of ``2C`` (of every sample
when packed). K/V blocks travel around the ring (rank r sends to r+1, receives from r-1), so at
step ``i`` rank ``r`` holds the K/V of rank ``src = (r - i) mod C``. For every (q chunk, k chunk)
pair the causal relation of their global chunk indices decides the work: earlier k chunk ->
full attention, same chunk -> causal diagonal, later k chunk -> skipped. With the zigzag layout
this leaves every rank the same amount of work at every step (step 0: the local causal block;
``src < r``: all of q against the first half of K/V; ``src > r``: the second half of q against
all of K/V). Partial outputs are merged exactly with their log-sum-exp.

The backward pass is a second ring: K/V travel again together with their dK/dV accumulators,
which take one extra hop to arrive home. Only local tensors are saved, so activation memory is
O(local sequence); the transient score block is O(local^2).

On CUDA with fp16/bf16 and ``ring_flash_attn`` installed, the same layout is handed to
``zigzag_ring_flash_attn_func`` / ``zigzag_ring_flash_attn_varlen_func`` (flash-attn kernels).
The pure PyTorch path below is the reference that the CPU tests prove against full attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.context_parallel import zigzag_positions

try:  # GPU extra (pip install ring-flash-attn); absent on CPU machines.
    from ring_flash_attn import zigzag_ring_flash_attn_func, zigzag_ring_flash_attn_varlen_func

    HAVE_RING_FLASH_ATTN = True
except ImportError:  # pragma: no cover - depends on the machine
    HAVE_RING_FLASH_ATTN = False

_KV_TAG, _DKV_TAG = 0, 1


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cp_group: dist.ProcessGroup,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    head_stride: int | None = None,
) -> torch.Tensor:
    """Causal attention over the global sequence from this rank's zigzag shards of q, k, v.

    Padded batches: ``q`` is ``[s_local, b, heads, head_dim]``, ``k``/``v`` ``[s_local, b,
    kv_heads, head_dim]``. Packed batches: ``[t_local, heads, head_dim]`` with ``cu_seqlens`` the
    LOCAL boundaries (each sample already zigzag-split, i.e. global padded ``cu_seqlens //
    cp_size``); tokens after ``cu_seqlens[-1]`` get a zero output. ``heads`` must be a multiple
    of ``kv_heads`` (GQA: query head ``i`` uses kv head ``i // (heads // kv_heads)``).

    ``head_stride`` (kv heads per ring pass, like OpenRLHF's ``--ring_head_stride``) runs the
    ring once per group of kv heads, so each K/V message and buffer is that much smaller.
    Returns a tensor shaped like ``q``.
    """
    _validate(q, k, v, cp_group=cp_group, cu_seqlens=cu_seqlens)
    num_kv_heads = k.shape[-2]
    if head_stride is None or head_stride >= num_kv_heads:
        return _ring_attention_all_heads(q, k, v, cp_group=cp_group, scale=scale, cu_seqlens=cu_seqlens)
    if num_kv_heads % head_stride:
        raise ValueError(f"head_stride ({head_stride}) must divide the number of kv heads ({num_kv_heads})")
    group_size = q.shape[-2] // num_kv_heads
    outs = [
        _ring_attention_all_heads(
            q[..., first * group_size:(first + head_stride) * group_size, :],
            k[..., first:first + head_stride, :],
            v[..., first:first + head_stride, :],
            cp_group=cp_group,
            scale=scale,
            cu_seqlens=cu_seqlens,
        )
        for first in range(0, num_kv_heads, head_stride)
    ]
    return torch.cat(outs, dim=-2)


def _validate(q, k, v, *, cp_group, cu_seqlens) -> None:
    if cp_group is None:
        raise ValueError("ring_attention needs an explicit cp_group")
    expected_dim = 4 if cu_seqlens is None else 3
    if not q.dim() == k.dim() == v.dim() == expected_dim:
        raise ValueError(
            f"expected {expected_dim}-d q/k/v ({'[s, b, h, d]' if cu_seqlens is None else '[t, h, d]'}), "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q/k/v shapes do not match: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"query heads ({q.shape[-2]}) must be a multiple of kv heads ({k.shape[-2]})")
    if cu_seqlens is None and q.shape[0] % 2:
        raise ValueError(f"local sequence length ({q.shape[0]}) must be even (two zigzag chunks)")


def _ring_attention_all_heads(q, k, v, *, cp_group, scale, cu_seqlens):
    if cu_seqlens is not None and int(cu_seqlens[-1]) < q.shape[0]:
        # Trailing padding outside every sample: attend nothing, output zeros.
        used = int(cu_seqlens[-1])
        out = _ring_attention_all_heads(q[:used], k[:used], v[:used], cp_group=cp_group, scale=scale,
                                        cu_seqlens=cu_seqlens)
        return torch.cat([out, out.new_zeros(q.shape[0] - used, *out.shape[1:])])
    if _use_ring_flash(q):
        return _ring_flash_attention(q, k, v, cp_group=cp_group, scale=scale, cu_seqlens=cu_seqlens)
    cp_size = dist.get_world_size(group=cp_group)
    layout = _ZigzagLayout.build(q.shape[0], cu_seqlens, cp_size=cp_size, device=q.device)
    # Internal layout: q [b, kv_heads, group, n, d], k/v stacked [2, b, kv_heads, n, d] so that one
    # message carries both and GQA broadcasts instead of copying K/V per query head.
    q5, kv = _to_internal(q, k, v, packed=cu_seqlens is not None)
    out5 = _RingAttentionFunction.apply(q5, kv, layout, cp_group, scale)
    return _from_internal(out5, packed=cu_seqlens is not None)


def _to_internal(q, k, v, *, packed: bool):
    if packed:  # [t, h, d] -> [1, t, h, d]
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    else:  # [s, b, h, d] -> [b, s, h, d]
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    batch, seq, heads, dim = q.shape
    kv_heads = k.shape[2]
    q5 = q.permute(0, 2, 1, 3).reshape(batch, kv_heads, heads // kv_heads, seq, dim)
    kv = torch.stack([k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)])
    return q5, kv


def _from_internal(out5, *, packed: bool):
    batch, kv_heads, group, seq, dim = out5.shape
    out = out5.reshape(batch, kv_heads * group, seq, dim).permute(2, 0, 1, 3)  # [n, b, h, d]
    return out[:, 0] if packed else out


# --------------------------------------------------------------------------------------------
# Layout: which local tokens form each zigzag chunk, and their global positions per owner rank.
# --------------------------------------------------------------------------------------------

FULL, DIAGONAL, SKIP = "full", "diagonal", "skip"


def chunk_pair_mode(q_chunk: int, k_chunk: int) -> str:
    """Causal relation of two global chunks: k before q -> full, same chunk -> diagonal, else skip."""
    if k_chunk < q_chunk:
        return FULL
    return DIAGONAL if k_chunk == q_chunk else SKIP


def _chunk_index(owner: int, half: int, cp_size: int) -> int:
    return owner if half == 0 else 2 * cp_size - 1 - owner


@dataclass(frozen=True)
class _ZigzagLayout:
    """Token sets of the two local chunks (slices when padded, index tensors when packed)."""

    num_tokens: int
    cp_size: int
    halves: tuple  # (first chunk, second chunk): slice or LongTensor over local tokens
    sample_lengths: tuple[int, ...] | None  # local lengths per packed sample, None when padded
    device: torch.device

    @staticmethod
    def build(num_tokens: int, cu_seqlens, *, cp_size: int, device) -> "_ZigzagLayout":
        if cu_seqlens is None:
            half = num_tokens // 2
            return _ZigzagLayout(num_tokens, cp_size, (slice(0, half), slice(half, num_tokens)), None, device)
        bounds = cu_seqlens.tolist()
        lengths = tuple(end - start for start, end in zip(bounds[:-1], bounds[1:]))
        if any(length % 2 for length in lengths):
            raise ValueError(f"local sample lengths must be even (zigzag split of each sample), got {lengths}")
        first = [torch.arange(s, s + n // 2) for s, n in zip(bounds[:-1], lengths)]
        second = [torch.arange(s + n // 2, s + n) for s, n in zip(bounds[:-1], lengths)]
        halves = (torch.cat(first).to(device), torch.cat(second).to(device))
        return _ZigzagLayout(num_tokens, cp_size, halves, lengths, device)

    def positions(self, owner: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample id, global position inside its sample) of each local token of rank ``owner``."""
        if self.sample_lengths is None:
            pos = zigzag_positions(self.num_tokens * self.cp_size, owner, self.cp_size, device=self.device)
            return torch.zeros_like(pos), pos
        ids, pos = [], []
        for sample, length in enumerate(self.sample_lengths):
            if length:
                pos.append(zigzag_positions(length * self.cp_size, owner, self.cp_size, device=self.device))
                ids.append(torch.full((length,), sample, device=self.device))
        return torch.cat(ids), torch.cat(pos)


def _select(x: torch.Tensor, tokens, dim: int) -> torch.Tensor:
    """Tokens ``tokens`` (None = all, slice, or LongTensor) of ``x`` along ``dim``."""
    if tokens is None:
        return x
    if isinstance(tokens, slice):
        return x.narrow(dim, tokens.start, tokens.stop - tokens.start)
    return x.index_select(dim, tokens)


@dataclass
class _Block:
    """One attention call of a ring step: q tokens of one local chunk against some K/V tokens."""

    q_half: int
    kv_tokens: object  # None (all), slice or LongTensor
    mask: torch.Tensor | None  # [n_q, n_kv] bool, True = attend


def _plan_step(layout: _ZigzagLayout, rank: int, src: int, positions: dict) -> list[_Block]:
    """The attention calls of the step where rank ``rank`` holds the K/V of rank ``src``."""
    blocks = []
    for q_half in (0, 1):
        q_chunk = _chunk_index(rank, q_half, layout.cp_size)
        modes = [chunk_pair_mode(q_chunk, _chunk_index(src, kv_half, layout.cp_size)) for kv_half in (0, 1)]
        kv_halves = [h for h in (0, 1) if modes[h] != SKIP]
        if not kv_halves:
            continue
        kv_tokens = None if kv_halves == [0, 1] else layout.halves[kv_halves[0]]
        causal = DIAGONAL in modes
        packed = layout.sample_lengths is not None and len(layout.sample_lengths) > 1
        mask = None
        if causal or packed:
            q_ids, q_pos = (_select(t, layout.halves[q_half], 0) for t in positions[rank])
            kv_ids, kv_pos = (_select(t, kv_tokens, 0) for t in positions[src])
            # Same sample, and not in the future (always true for FULL pairs, causal on DIAGONAL).
            mask = (q_ids[:, None] == kv_ids[None, :]) & (q_pos[:, None] >= kv_pos[None, :])
        blocks.append(_Block(q_half, kv_tokens, mask))
    return blocks


# --------------------------------------------------------------------------------------------
# Block math on [b, kv_heads, group, n, d] queries and [b, kv_heads, m, d] keys/values, in fp32
# (or fp64) so that merging partial softmaxes loses nothing for half-precision inputs.
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[b, kv_heads, group, n, ...] -> [b, kv_heads, group*n, ...]: the heads of a GQA group share K/V,
    so they become extra rows of one matmul instead of broadcasting (which would copy K/V)."""
    return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3], *x.shape[4:])


def _block_probs(q, k, mask, scale, lse=None):
    """Masked scores ``[b, kv_heads, group, n, m]`` of q against k; exp-normalised by ``lse`` if given."""
    scores = torch.matmul(_rows(q), k.transpose(-1, -2)).mul_(scale).view(*q.shape[:-1], k.shape[-2])
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    if lse is None:
        return scores
    return scores.sub_(lse.unsqueeze(-1)).exp_()


def _block_forward(q, k, v, mask, scale):
    scores = _block_probs(q, k, mask, scale)
    lse = torch.logsumexp(scores, dim=-1)
    probs = scores.sub_(lse.unsqueeze(-1)).exp_()
    return torch.matmul(_rows(probs), v).view(q.shape), lse


def _block_backward(q, k, v, mask, scale, dout, lse, delta):
    """Gradients of one block given the GLOBAL row statistics ``lse`` and ``delta = sum(dout*out)``."""
    probs = _block_probs(q, k, mask, scale, lse=lse)
    dout_rows = _rows(dout)
    dv = torch.matmul(_rows(probs).transpose(-1, -2), dout_rows)  # sums over the GQA group
    dscores = torch.matmul(dout_rows, v.transpose(-1, -2)).view(probs.shape)
    dscores.sub_(delta.unsqueeze(-1)).mul_(probs)
    del probs
    dq = torch.matmul(_rows(dscores), k).mul_(scale).view(q.shape)
    dk = torch.matmul(_rows(dscores).transpose(-1, -2), _rows(q)).mul_(scale)
    return dq, dk, dv


def _merge(acc, block):
    """Exact merge of two partial softmax-attention results ``(out, lse)`` over disjoint keys."""
    if acc is None:
        return block
    (out, lse), (block_out, block_lse) = acc, block
    new_lse = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - new_lse).unsqueeze(-1) + block_out * torch.exp(block_lse - new_lse).unsqueeze(-1)
    return out, new_lse


def _join_halves(layout: _ZigzagLayout, parts, dim: int) -> torch.Tensor:
    """Put per-chunk results (in ``layout.halves`` order) back into local token order along ``dim``."""
    if layout.sample_lengths is None:
        return torch.cat(parts, dim=dim)
    shape = list(parts[0].shape)
    shape[dim] = layout.num_tokens
    joined = parts[0].new_empty(shape)
    for tokens, part in zip(layout.halves, parts):
        joined.index_copy_(dim, tokens, part)
    return joined


# --------------------------------------------------------------------------------------------
# Ring communication and the two rings.
# --------------------------------------------------------------------------------------------


class _RingComm:
    """Send to the next rank of ``group`` and receive from the previous one, asynchronously."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group=group)
        self.size = dist.get_world_size(group=group)
        self.next_rank = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev_rank = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, tensor: torch.Tensor, *, tag: int):
        """Post the exchange; returns a callable that waits and yields the received tensor."""
        received = torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, tensor, self.next_rank, group=self.group, tag=tag),
            dist.P2POp(dist.irecv, received, self.prev_rank, group=self.group, tag=tag),
        ]
        requests = dist.batch_isend_irecv(ops)

        def wait() -> torch.Tensor:
            for request in requests:
                request.wait()
            return received

        return wait


def _ring_forward(q5, kv, layout, comm, scale):
    compute = _compute_dtype(q5.dtype)
    qc = q5.to(compute)
    positions = {comm.rank: layout.positions(comm.rank)}
    acc = [None, None]
    for step in range(comm.size):
        # Post the next block's transfer first so that it overlaps this block's compute.
        pending = comm.start(kv, tag=_KV_TAG) if step + 1 < comm.size else None
        src = (comm.rank - step) % comm.size
        positions.setdefault(src, layout.positions(src))
        kvc = kv.to(compute)
        for block in _plan_step(layout, comm.rank, src, positions):
            q_block = _select(qc, layout.halves[block.q_half], 3)
            k_block, v_block = (_select(t, block.kv_tokens, 2) for t in kvc)
            acc[block.q_half] = _merge(acc[block.q_half], _block_forward(q_block, k_block, v_block, block.mask, scale))
        if pending is not None:
            kv = pending()
    out = _join_halves(layout, [acc[0][0], acc[1][0]], dim=3)
    lse = _join_halves(layout, [acc[0][1], acc[1][1]], dim=3)
    return out.to(q5.dtype), lse


def _ring_backward(q5, kv, out, lse, dout, layout, comm, scale):
    compute = _compute_dtype(q5.dtype)
    qc, doutc = q5.to(compute), dout.to(compute)
    delta = (doutc * out.to(compute)).sum(dim=-1)
    positions = {comm.rank: layout.positions(comm.rank)}
    dq = torch.zeros_like(qc)
    dkv, dkv_pending = None, None
    for step in range(comm.size):
        kv_pending = comm.start(kv, tag=_KV_TAG) if step + 1 < comm.size else None
        src = (comm.rank - step) % comm.size
        positions.setdefault(src, layout.positions(src))
        block_dkv = _backward_step(qc, kv.to(compute), doutc, lse, delta, dq, layout, comm.rank, src, positions, scale)
        # dK/dV of rank src's block travel with it: add ours to what the previous ranks summed.
        dkv = block_dkv if dkv_pending is None else dkv_pending() + block_dkv
        dkv_pending = comm.start(dkv, tag=_DKV_TAG) if comm.size > 1 else None
        if kv_pending is not None:
            kv = kv_pending()
    # One more hop: after C sends each accumulator is back at the rank that owns the block.
    dkv = dkv_pending() if dkv_pending is not None else dkv
    return dq.to(q5.dtype), dkv.to(kv.dtype)


def _backward_step(qc, kvc, doutc, lse, delta, dq, layout, rank, src, positions, scale):
    """Adds this step's contribution into ``dq`` and returns dK/dV (stacked) for rank src's block."""
    dkv = torch.zeros_like(kvc)
    for block in _plan_step(layout, rank, src, positions):
        q_tokens = layout.halves[block.q_half]
        k_block, v_block = (_select(t, block.kv_tokens, 2) for t in kvc)
        dq_block, dk_block, dv_block = _block_backward(
            _select(qc, q_tokens, 3), k_block, v_block, block.mask, scale,
            _select(doutc, q_tokens, 3), _select(lse, q_tokens, 3), _select(delta, q_tokens, 3),
        )
        _add_tokens(dq, q_tokens, dq_block, dim=3)
        _add_tokens(dkv[0], block.kv_tokens, dk_block, dim=2)
        _add_tokens(dkv[1], block.kv_tokens, dv_block, dim=2)
    return dkv


def _add_tokens(target: torch.Tensor, tokens, values: torch.Tensor, *, dim: int) -> None:
    if tokens is None:
        target.add_(values)
    elif isinstance(tokens, slice):
        target.narrow(dim, tokens.start, tokens.stop - tokens.start).add_(values)
    else:
        target.index_add_(dim, tokens, values)


class _RingAttentionFunction(torch.autograd.Function):
    """Forward and backward rings; saves only local q, k/v, output and log-sum-exp."""

    @staticmethod
    def forward(ctx, q5, kv, layout, cp_group, scale):
        comm = _RingComm(cp_group)
        out, lse = _ring_forward(q5, kv, layout, comm, scale)
        ctx.save_for_backward(q5, kv, out, lse)
        ctx.layout, ctx.comm, ctx.scale = layout, comm, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q5, kv, out, lse = ctx.saved_tensors
        dq, dkv = _ring_backward(q5, kv, out, lse, dout.contiguous(), ctx.layout, ctx.comm, ctx.scale)
        return dq, dkv, None, None, None


# --------------------------------------------------------------------------------------------
# GPU: ring-flash-attn's zigzag kernels take the same layout.
# --------------------------------------------------------------------------------------------


def _use_ring_flash(q: torch.Tensor) -> bool:
    return HAVE_RING_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _ring_flash_attention(q, k, v, *, cp_group, scale, cu_seqlens):  # pragma: no cover - needs CUDA
    if cu_seqlens is None:
        # ring-flash-attn wants [b, s, h, d]; flash-attn only needs the last dim contiguous.
        out = zigzag_ring_flash_attn_func(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            softmax_scale=scale, causal=True, group=cp_group,
        )
        return out.transpose(0, 1)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    return zigzag_ring_flash_attn_varlen_func(
        q, k, v, cu, max_seqlen, softmax_scale=scale, causal=True, group=cp_group,
    )
