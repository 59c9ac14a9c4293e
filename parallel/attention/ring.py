"""Ring attention over a context-parallel group, for the zigzag layout of ``parallel.context_parallel``.

Each CP rank holds a zigzag shard of q/k/v: chunks ``r`` and ``2C-1-r`` of ``2C`` (of every sample
when packed). K/V travel around the ring (rank r sends to r+1, receives from r-1), so at step
``i`` rank ``r`` holds the K/V of rank ``src = (r - i) mod C``. For every (q chunk, k chunk) pair
the causal relation of their global chunk indices decides the work: earlier k chunk -> full
attention, same chunk -> causal diagonal, later k chunk -> skipped. With the zigzag layout every
rank does the same work at every step (step 0: the local causal block; ``src < r``: all of q
against the first half of K/V; ``src > r``: the second half of q against all of K/V). Partial
outputs are merged exactly with their log-sum-exp.

The backward pass is a second ring: K/V travel again together with their dK/dV accumulators,
which take one extra hop to arrive home. Only local tensors are saved (q, k, v themselves, the
output and its log-sum-exp), so activation memory is O(local sequence).

Block kernels (``parallel.attention.kernels.choose_ring_block_kernel``): on CPU, PyTorch's fused
flash kernel (what SDPA runs there); on CUDA, PyTorch's memory-efficient kernel in the inputs' own
dtype (packed blocks' masks as an additive bias). Both return the log-sum-exp and never
materialise the score block; partial results are merged in fp32. Elsewhere an explicit-math
kernel. On CUDA with fp16/bf16 and ``ring_flash_attn`` importable, the whole ring is handed to its
``zigzag_ring_flash_attn_func`` / ``zigzag_ring_flash_attn_varlen_func``, which use this layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.attention import kernels
from parallel.context_parallel import zigzag_positions

# Point-to-point tags: K and V, then dK and dV, may be in flight between the same ranks at once.
_KV_TAGS, _DKV_TAGS = (0, 1), (2, 3)


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
    kv_heads, head_dim]`` (``v`` may have its own head size: multi-head latent attention). Packed
    batches: ``[t_local, heads, head_dim]`` with ``cu_seqlens`` the
    LOCAL boundaries (each sample already zigzag-split, i.e. global padded ``cu_seqlens //
    cp_size``); tokens after ``cu_seqlens[-1]`` get a zero output. ``heads`` must be a multiple
    of ``kv_heads`` (GQA: query head ``i`` uses kv head ``i // (heads // kv_heads)``).

    ``head_stride`` (kv heads per ring pass, like OpenRLHF's ``--ring_head_stride``) runs the
    ring once per group of kv heads, so each K/V message and buffer is that much smaller.
    Returns a tensor shaped like ``q`` with ``v``'s head size.
    """
    _validate(q, k, v, cp_group=cp_group, cu_seqlens=cu_seqlens)
    if v.shape[-1] != q.shape[-1]:
        # The block kernels (CPU flash, ring-flash-attn) take one head size: pad, then trim.
        out = ring_attention(*kernels.equal_head_dims(q, k, v), cp_group=cp_group, scale=scale,
                             cu_seqlens=cu_seqlens, head_stride=head_stride)
        return kernels.trim_head_dim(out, v.shape[-1])
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
    if k.shape[:-1] != v.shape[:-1] or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
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
    layout = _ZigzagLayout.build(q.shape[0], cu_seqlens, cp_size=dist.get_world_size(group=cp_group),
                                 device=q.device)
    # Internally everything stays in the caller's [n, b, h, d] layout (packed: b = 1), token dim 0:
    # K/V are sent as they are, and kernels get [b, h, n, d] views, so nothing is copied.
    if cu_seqlens is not None:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    out = _RingAttentionFunction.apply(q, k.contiguous(), v.contiguous(), layout, cp_group, scale)
    return out.squeeze(1) if cu_seqlens is not None else out


# --------------------------------------------------------------------------------------------
# Layout: which local tokens form each zigzag chunk, and which attention calls a step needs.
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
    _positions: dict = field(default_factory=dict, compare=False, repr=False)

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

    def packed_positions(self, owner: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample id, global position inside its sample) of each local token of rank ``owner``."""
        if owner not in self._positions:
            ids, pos = [], []
            for sample, length in enumerate(self.sample_lengths):
                pos.append(zigzag_positions(length * self.cp_size, owner, self.cp_size, device=self.device))
                ids.append(torch.full((length,), sample, device=self.device))
            self._positions[owner] = (torch.cat(ids), torch.cat(pos))
        return self._positions[owner]


def _select(x: torch.Tensor, tokens) -> torch.Tensor:
    """Tokens ``tokens`` (None = all, slice, or LongTensor) of ``x`` along dim 0."""
    if tokens is None:
        return x
    if isinstance(tokens, slice):
        return x[tokens]
    return x.index_select(0, tokens)


@dataclass
class _Block:
    """One attention call of a ring step: q tokens of one local chunk against some K/V tokens.

    ``causal`` marks a square diagonal pair (top-left aligned causal mask); ``mask`` ([n_q,
    n_kv] bool, True = attend) is only built for packed batches, where samples must not mix.
    """

    q_half: int
    kv_tokens: object  # None (all), slice or LongTensor
    causal: bool = False
    mask: torch.Tensor | None = None


def _plan_step(layout: _ZigzagLayout, rank: int, src: int) -> list[_Block]:
    """The attention calls of the step where rank ``rank`` holds the K/V of rank ``src``."""
    blocks = []
    for q_half in (0, 1):
        q_chunk = _chunk_index(rank, q_half, layout.cp_size)
        modes = [chunk_pair_mode(q_chunk, _chunk_index(src, kv_half, layout.cp_size)) for kv_half in (0, 1)]
        if layout.sample_lengths is None:
            blocks += _padded_blocks(layout, q_half, modes)
        elif modes != [SKIP, SKIP]:
            blocks.append(_packed_block(layout, q_half, modes, rank, src))
    return blocks


def _padded_blocks(layout, q_half: int, modes: list[str]) -> list[_Block]:
    if modes == [FULL, FULL]:
        return [_Block(q_half, None)]  # one call over all of K/V
    return [
        _Block(q_half, layout.halves[kv_half], causal=mode == DIAGONAL)
        for kv_half, mode in enumerate(modes)
        if mode != SKIP
    ]


def _packed_block(layout, q_half: int, modes: list[str], rank: int, src: int) -> _Block:
    kv_halves = [h for h in (0, 1) if modes[h] != SKIP]
    kv_tokens = None if kv_halves == [0, 1] else layout.halves[kv_halves[0]]
    q_ids, q_pos = (_select(t, layout.halves[q_half]) for t in layout.packed_positions(rank))
    kv_ids, kv_pos = (_select(t, kv_tokens) for t in layout.packed_positions(src))
    # Same sample, and not in the future (always true for FULL pairs, causal on DIAGONAL ones).
    mask = (q_ids[:, None] == kv_ids[None, :]) & (q_pos[:, None] >= kv_pos[None, :])
    return _Block(q_half, kv_tokens, mask=mask)


# --------------------------------------------------------------------------------------------
# Block kernels on q [b, heads, n, d] and k/v [b, kv_heads, m, d] views (GQA: query head i uses
# kv head i // group). They return / take the block's log-sum-exp [b, heads, n], which makes
# partial results mergeable and the backward exact given the GLOBAL out and lse of the rows.
# --------------------------------------------------------------------------------------------

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def block_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """The block kernel of our own ring for ``dtype`` inputs on ``device`` (``kernels.RING_BLOCK_KERNELS``)."""
    return kernels.choose_ring_block_kernel(device_type=device.type, dtype=dtype, cpu_flash=_FLASH_CPU is not None,
                                            cuda_efficient=kernels.CUDA_EFFICIENT_OPS)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Partial results are merged in fp32 (fp64 stays fp64) so half-precision inputs lose nothing.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_dtype(dtype: torch.dtype, kernel: str) -> torch.dtype:
    # The CUDA kernel takes bf16 / fp16 as they are (tensor cores; it accumulates in fp32 itself).
    return dtype if kernel == "cuda_efficient" else _compute_dtype(dtype)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 2, 0, 3)  # [n, b, h, d] -> [b, h, n, d], a view


def _additive_mask(block: _Block, dtype: torch.dtype) -> torch.Tensor | None:
    if block.mask is None:
        return None
    additive = torch.zeros(block.mask.shape, dtype=dtype, device=block.mask.device)
    return additive.masked_fill_(~block.mask, float("-inf"))


def _block_forward(q, k, v, block: _Block, scale: float, kernel: str):
    """(out [b, h, n, d], lse [b, h, n]) of q attending to k/v under the block's mask."""
    if kernel == "cuda_efficient":
        out, lse = kernels.efficient_block_forward(q, k, v, causal=block.causal, mask=block.mask, scale=scale)
        return out.float(), lse
    if kernel == "cpu_flash":
        return _FLASH_CPU(q, k, v, 0.0, block.causal, attn_mask=_additive_mask(block, q.dtype), scale=scale)
    scores = _math_scores(q, k, block, scale)
    lse = torch.logsumexp(scores, dim=-1)
    probs = scores.sub_(lse.unsqueeze(-1)).exp_()
    return torch.matmul(_rows(probs), v).view(q.shape), lse.flatten(1, 2)


def _block_backward(q, k, v, block: _Block, scale: float, dout, out, lse, kernel: str):
    """(dq, dk, dv) of one block, given the GLOBAL ``out`` and ``lse`` of these query rows."""
    if kernel == "cuda_efficient":
        return kernels.efficient_block_backward(q, k, v, causal=block.causal, mask=block.mask, scale=scale,
                                                dout=dout, out=out, lse=lse)
    if kernel == "cpu_flash":
        return _FLASH_CPU_BACKWARD(dout, q, k, v, out, lse, 0.0, block.causal,
                                   attn_mask=_additive_mask(block, q.dtype), scale=scale)
    group_shape = (q.shape[0], k.shape[1], -1, q.shape[2])  # [b, kv_heads, group, n]
    probs = _math_scores(q, k, block, scale).sub_(lse.reshape(group_shape).unsqueeze(-1)).exp_()
    delta = (dout * out).sum(dim=-1).reshape(group_shape)
    dout_rows = _rows(dout.reshape(*group_shape, q.shape[-1]))
    dv = torch.matmul(_rows(probs).transpose(-1, -2), dout_rows)  # sums over the GQA group
    dscores = torch.matmul(dout_rows, v.transpose(-1, -2)).view(probs.shape)
    dscores.sub_(delta.unsqueeze(-1)).mul_(probs)
    del probs
    dq = torch.matmul(_rows(dscores), k).mul_(scale).view(q.shape)
    dk = torch.matmul(_rows(dscores).transpose(-1, -2), _rows(q.reshape(*group_shape, q.shape[-1]))).mul_(scale)
    return dq, dk, dv


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[b, kv_heads, group, n, ...] -> [b, kv_heads, group*n, ...]: the query heads of a GQA group
    share K/V, so they become extra rows of one matmul instead of a broadcast (which copies K/V)."""
    return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3], *x.shape[4:])


def _math_scores(q, k, block: _Block, scale: float) -> torch.Tensor:
    """Masked scores [b, kv_heads, group, n, m] (the reference kernel; materialises the block)."""
    q5 = q.reshape(q.shape[0], k.shape[1], -1, *q.shape[2:])
    scores = torch.matmul(_rows(q5), k.transpose(-1, -2)).mul_(scale).view(*q5.shape[:-1], k.shape[-2])
    mask = block.mask
    if block.causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril_()
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return scores


def _merge(acc, block):
    """Exact merge of two partial softmax-attention results ``(out, lse)`` over disjoint keys."""
    if acc is None:
        return block
    (out, lse), (block_out, block_lse) = acc, block
    new_lse = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - new_lse).unsqueeze(-1) + block_out * torch.exp(block_lse - new_lse).unsqueeze(-1)
    return out, new_lse


def _join_halves(layout: _ZigzagLayout, parts) -> torch.Tensor:
    """Per-chunk results (token dim 0, in ``layout.halves`` order) back in local token order."""
    if layout.sample_lengths is None:
        return torch.cat(parts)
    joined = parts[0].new_empty(layout.num_tokens, *parts[0].shape[1:])
    for tokens, part in zip(layout.halves, parts):
        joined.index_copy_(0, tokens, part)
    return joined


def _add_tokens(target: torch.Tensor, tokens, values: torch.Tensor) -> None:
    """``target[tokens] += values`` along dim 0 (in the target's dtype: fp32 accumulators)."""
    values = values.to(target.dtype)
    if tokens is None:
        target.add_(values)
    elif isinstance(tokens, slice):
        target[tokens].add_(values)
    else:
        target.index_add_(0, tokens, values)


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

    def start(self, tensors: tuple[torch.Tensor, ...], tags: tuple[int, ...]):
        """Post the exchange of each tensor; returns a callable that waits and yields the received ones."""
        received = tuple(torch.empty_like(t) for t in tensors)
        ops = []
        for tensor, buffer, tag in zip(tensors, received, tags):
            ops.append(dist.P2POp(dist.isend, tensor, self.next_rank, group=self.group, tag=tag))
            ops.append(dist.P2POp(dist.irecv, buffer, self.prev_rank, group=self.group, tag=tag))
        requests = dist.batch_isend_irecv(ops)

        def wait() -> tuple[torch.Tensor, ...]:
            for request in requests:
                request.wait()
            return received

        return wait


def _ring_forward(q, kv, layout, comm, scale):
    """Returns out [b, h, n, d] and lse [b, h, n] in the compute dtype."""
    kernel = block_kernel(q.device, q.dtype)
    compute = _kernel_dtype(q.dtype, kernel)
    qc = q.to(compute)
    acc = [None, None]
    for step in range(comm.size):
        # Post the next block's transfer first so that it overlaps this block's compute.
        pending = comm.start(kv, _KV_TAGS) if step + 1 < comm.size else None
        src = (comm.rank - step) % comm.size
        kc, vc = (t.to(compute) for t in kv)
        for block in _plan_step(layout, comm.rank, src):
            q_block = _heads_first(_select(qc, layout.halves[block.q_half]))
            k_block, v_block = (_heads_first(_select(t, block.kv_tokens)) for t in (kc, vc))
            partial = _block_forward(q_block, k_block, v_block, block, scale, kernel)
            acc[block.q_half] = _merge(acc[block.q_half], partial)
        if pending is not None:
            kv = pending()
    out = _join_halves(layout, [acc[0][0].permute(2, 0, 1, 3), acc[1][0].permute(2, 0, 1, 3)])
    lse = _join_halves(layout, [acc[0][1].permute(2, 0, 1), acc[1][1].permute(2, 0, 1)])
    return out, lse  # [n, b, h, d] and [n, b, h]


def _ring_backward(q, kv, out, lse, dout, layout, comm, scale):
    kernel = block_kernel(q.device, q.dtype)
    compute = _kernel_dtype(q.dtype, kernel)
    qc, doutc = q.to(compute), dout.to(compute)
    dq = torch.zeros_like(qc, dtype=_compute_dtype(q.dtype))  # gradients accumulate in fp32
    dkv, dkv_pending = None, None
    for step in range(comm.size):
        kv_pending = comm.start(kv, _KV_TAGS) if step + 1 < comm.size else None
        src = (comm.rank - step) % comm.size
        kvc = tuple(t.to(compute) for t in kv)
        block_dkv = _backward_step(qc, kvc, doutc, out, lse, dq, layout, comm.rank, src, scale, kernel)
        # dK/dV of rank src's block travel with it: add ours to what the previous ranks summed
        # (in place: the received buffers are ours, and what we sent last step is untouched).
        if dkv_pending is None:
            dkv = block_dkv
        else:
            dkv = tuple(acc.add_(mine) for acc, mine in zip(dkv_pending(), block_dkv))
        del block_dkv
        dkv_pending = comm.start(dkv, _DKV_TAGS) if comm.size > 1 else None
        if kv_pending is not None:
            kv = kv_pending()
    # One more hop: after C sends each accumulator is back at the rank that owns the block.
    dk, dv = dkv_pending() if dkv_pending is not None else dkv
    return dq.to(q.dtype), dk.to(kv[0].dtype), dv.to(kv[1].dtype)


def _backward_step(qc, kvc, doutc, out, lse, dq, layout, rank, src, scale, kernel):
    """Adds this step's contribution into ``dq``; returns (dK, dV) for rank src's block."""
    dk, dv = (torch.zeros_like(t, dtype=dq.dtype) for t in kvc)
    for block in _plan_step(layout, rank, src):
        q_tokens = layout.halves[block.q_half]
        k_block, v_block = (_heads_first(_select(t, block.kv_tokens)) for t in kvc)
        dq_block, dk_block, dv_block = _block_backward(
            _heads_first(_select(qc, q_tokens)), k_block, v_block, block, scale,
            _heads_first(_select(doutc, q_tokens)), _heads_first(_select(out, q_tokens)),
            _select(lse, q_tokens).permute(1, 2, 0), kernel,
        )
        _add_tokens(dq, q_tokens, dq_block.permute(2, 0, 1, 3))
        _add_tokens(dk, block.kv_tokens, dk_block.permute(2, 0, 1, 3))
        _add_tokens(dv, block.kv_tokens, dv_block.permute(2, 0, 1, 3))
    return dk, dv


class _RingAttentionFunction(torch.autograd.Function):
    """Forward and backward rings on [n, b, h, d] shards; saves q, k, v, the output and lse."""

    @staticmethod
    def forward(ctx, q, k, v, layout, cp_group, scale):
        comm = _RingComm(cp_group)
        out, lse = _ring_forward(q, (k, v), layout, comm, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.comm, ctx.scale = layout, comm, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(q, (k, v), out, lse, dout, ctx.layout, ctx.comm, ctx.scale)
        return dq, dk, dv, None, None, None


# --------------------------------------------------------------------------------------------
# GPU: ring-flash-attn's zigzag kernels take the same layout.
# --------------------------------------------------------------------------------------------


def _use_ring_flash(q: torch.Tensor) -> bool:
    if not (q.is_cuda and q.dtype in kernels.HALF):  # no import attempt where it could not run anyway
        return False
    return kernels.choose_ring_flash_attn(device_type=q.device.type, dtype=q.dtype,
                                          ring_flash_attn=kernels.have("ring_flash_attn"))


def _ring_flash_attention(q, k, v, *, cp_group, scale, cu_seqlens):  # pragma: no cover - needs CUDA
    from ring_flash_attn import zigzag_ring_flash_attn_func, zigzag_ring_flash_attn_varlen_func

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
