"""Context parallelism: zigzag layout helpers and ring attention against single-rank attention.

The oracle is full causal attention computed on one rank (``core_attention``'s SDPA paths);
every CP rank compares its own zigzag shard of the output and of dQ/dK/dV with it.
"""
from __future__ import annotations

import contextlib
import types

import pytest
import torch
import torch.distributed as dist

from parallel.attention import ring as ring_module
from parallel.attention.core_attention import packed_causal, sdpa_causal
from parallel.attention.ring import chunk_pair_mode, ring_attention
from parallel.context_parallel import (
    local_cu_seqlens,
    pad_packed_for_cp,
    zigzag_gather,
    zigzag_positions,
    zigzag_split,
    zigzag_split_packed,
    zigzag_unsplit,
)
from tests.dist_harness import run_distributed
from tests.fake_cuda_attention import cuda_kernels_on_cpu
from tools.bench.bench_ring_attention import PeakLiveBytes

ATOL = 1e-5


# ------------------------------------------------------------------ helpers (single process)


def _full_inputs(*, seq_len, batch, heads, kv_heads, head_dim, seed, packed, v_dim=None):
    """q, k, v, and output weights (for a non-trivial loss) in the global layout (``v_dim``: v's own
    head size, as multi-head latent attention has)."""
    v_dim = v_dim or head_dim
    gen = torch.Generator().manual_seed(seed)
    lead = (seq_len,) if packed else (seq_len, batch)
    q = torch.randn(*lead, heads, head_dim, generator=gen)
    k = torch.randn(*lead, kv_heads, head_dim, generator=gen)
    v = torch.randn(*lead, kv_heads, v_dim, generator=gen)
    weights = torch.randn(*lead, heads, v_dim, generator=gen)
    return q, k, v, weights


def _reference(q, k, v, weights, *, scale, cu_seqlens=None):
    """Full causal attention on one rank: output and (dq, dk, dv) of ``sum(out * weights)``."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    if cu_seqlens is None:
        out = sdpa_causal(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale).transpose(0, 1)
    else:
        out = packed_causal(q, k, v, cu_seqlens, scale=scale)
    (out * weights).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


# ------------------------------------------------------------------ distributed bodies


def _init(rank, world_size):
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)


def _cp_groups(world_size, cp_size):
    """Every rank creates every group (collective); CP groups are strided so group rank != global rank."""
    num_groups = world_size // cp_size
    mine = None
    for first in range(num_groups):
        ranks = list(range(first, world_size, num_groups))
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine


def _check_case(case, cp_group):
    """Run one case on this rank's shard.

    Returns the max abs errors of (out, dq, dk, dv) against the oracle, and the max difference
    between ``CoreAttention`` (fed Megatron-style global ``PackedSeqParams``) and ring_attention.
    """
    cp_rank, cp_size = dist.get_rank(group=cp_group), dist.get_world_size(group=cp_group)
    packed = case.get("lengths") is not None
    scale = case["head_dim"] ** -0.5
    if packed:
        cu = torch.tensor([0, *torch.tensor(case["lengths"]).cumsum(0).tolist()])
        seq_len = int(cu[-1])
    else:
        cu, seq_len = None, case["seq_len"]
    q, k, v, weights = _full_inputs(seq_len=seq_len, batch=case.get("batch", 1), heads=case["heads"],
                                    kv_heads=case["kv_heads"], head_dim=case["head_dim"], seed=case["seed"],
                                    packed=packed, v_dim=case.get("v_dim"))
    # Oracle on the UNPADDED sequence: padding each sample for CP must not change real tokens.
    expected = _reference(q, k, v, weights, scale=scale, cu_seqlens=cu)

    if packed:
        shard = lambda t: zigzag_split_packed(t, cu, dim=0, cp_rank=cp_rank, cp_size=cp_size)[0]  # noqa: E731
        local_cu = zigzag_split_packed(q, cu, dim=0, cp_rank=cp_rank, cp_size=cp_size)[1]
    else:
        shard = lambda t: zigzag_split(t, dim=0, cp_rank=cp_rank, cp_size=cp_size)  # noqa: E731
        local_cu = None
    q_l, k_l, v_l = (shard(t).requires_grad_() for t in (q, k, v))
    # Pad tokens get zero weight (like a loss mask), so their meaningless outputs drop out.
    with _block_kernel(case.get("kernel", "fused")):
        out = ring_attention(q_l, k_l, v_l, cp_group=cp_group, scale=scale, cu_seqlens=local_cu,
                             head_stride=case.get("head_stride"))
        (out * shard(weights)).sum().backward()
    actual = (out.detach(), q_l.grad, k_l.grad, v_l.grad)
    real = shard(torch.ones(q.shape[: 1 if packed else 2])).bool()
    errors = [float((a - shard(e))[real].abs().max()) for a, e in zip(actual, expected)]
    via_module = _core_attention(q_l, k_l, v_l, cp_group=cp_group, scale=scale, cu_seqlens=cu)
    return errors + [float((via_module - out.flatten(-2)).abs().max())]


@contextlib.contextmanager
def _block_kernel(kind: str):
    """Force the explicit-math block kernel (what runs where PyTorch's CPU flash kernel can't), or
    the CUDA one (torch's memory-efficient kernel) through its CPU stand-in."""
    if kind == "cuda_efficient":
        with cuda_kernels_on_cpu():
            yield
        return
    saved = ring_module._FLASH_CPU
    if kind == "math":
        ring_module._FLASH_CPU = None
    try:
        yield
    finally:
        ring_module._FLASH_CPU = saved


def _core_attention(q, k, v, *, cp_group, scale, cu_seqlens):
    """The same shard through ``CoreAttention`` with Megatron-style GLOBAL ``PackedSeqParams``."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from parallel.attention.core_attention import CoreAttention

    config = types.SimpleNamespace(kv_channels=q.shape[-1], hidden_size=q.shape[-1] * q.shape[-2],
                                   num_attention_heads=q.shape[-2], attention_dropout=0.0)
    module = CoreAttention(config, layer_number=1, attn_mask_type=None, attention_type="self",
                           softmax_scale=scale, pg_collection=types.SimpleNamespace(cp=cp_group))
    params = None
    if cu_seqlens is not None:
        cp_size = dist.get_world_size(group=cp_group)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                 cu_seqlens_q_padded=pad_packed_for_cp(cu_seqlens, cp_size),
                                 cu_seqlens_kv_padded=pad_packed_for_cp(cu_seqlens, cp_size))
    with torch.no_grad():
        return module(q, k, v, None, packed_seq_params=params)


_CASES = [
    dict(name="padded-gqa", seq_len=48, batch=2, heads=4, kv_heads=2, head_dim=8, seed=1),
    dict(name="padded-mha-stride", seq_len=48, batch=1, heads=4, kv_heads=4, head_dim=8, seed=2, head_stride=2),
    dict(name="packed-odd-gqa", lengths=[5, 11, 7], heads=4, kv_heads=1, head_dim=8, seed=3),
    dict(name="packed-aligned", lengths=[16, 8, 24], heads=2, kv_heads=2, head_dim=8, seed=4),
    dict(name="padded-gqa-math", seq_len=48, batch=2, heads=4, kv_heads=2, head_dim=8, seed=5, kernel="math"),
    dict(name="packed-odd-gqa-math", lengths=[5, 11, 7], heads=4, kv_heads=1, head_dim=8, seed=6, kernel="math"),
    dict(name="padded-gqa-cuda", seq_len=48, batch=2, heads=4, kv_heads=2, head_dim=8, seed=7, kernel="cuda_efficient"),
    dict(name="packed-odd-gqa-cuda", lengths=[5, 11, 7], heads=4, kv_heads=1, head_dim=8, seed=8,
         kernel="cuda_efficient"),
    # Multi-head latent attention: v's head size is not q/k's.
    dict(name="padded-mla-v", seq_len=48, batch=2, heads=4, kv_heads=4, head_dim=12, v_dim=6, seed=9),
    dict(name="packed-mla-v-stride", lengths=[5, 11, 7], heads=4, kv_heads=4, head_dim=12, v_dim=6, seed=10,
         head_stride=2),
    dict(name="packed-mla-v-math", lengths=[5, 11, 7], heads=2, kv_heads=2, head_dim=6, v_dim=10, seed=11,
         kernel="math"),
]


def _ring_body(rank, world_size, cp_size):
    _init(rank, world_size)
    cp_group = _cp_groups(world_size, cp_size)
    return {case["name"]: _check_case(case, cp_group) for case in _CASES}


def _layout_body(rank, world_size):
    _init(rank, world_size)
    cp_group = dist.new_group(list(range(world_size)))
    full = torch.arange(2 * 3 * 16, dtype=torch.float32).view(2, 3 * 16, 1)
    local = zigzag_split(full, dim=1, cp_rank=rank, cp_size=world_size).requires_grad_()
    gathered = zigzag_gather(local, dim=1, cp_group=cp_group)
    # Every rank uses the whole gathered tensor, so each shard's gradient sums over the ranks.
    gathered.sum().backward()
    return bool(torch.equal(gathered, full)), bool(torch.equal(local.grad, torch.full_like(local, world_size)))


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("cp_size", [2, 4])
def test_ring_attention_matches_full_attention(cp_size):
    """CP=2 runs as two strided CP groups of 2 on 4 ranks; CP=4 as one group of 4."""
    results = run_distributed(_ring_body, world_size=4, args=(cp_size,), timeout=120)
    for rank, errors in enumerate(results):
        for name, (out, dq, dk, dv, module) in errors.items():
            assert max(out, dq, dk, dv) < ATOL, f"rank {rank} {name}: out {out} dq {dq} dk {dk} dv {dv}"
            assert module < ATOL, f"rank {rank} {name}: CoreAttention differs from ring_attention by {module}"


def test_zigzag_gather_round_trip_and_gradient():
    results = run_distributed(_layout_body, world_size=4, timeout=60)
    assert all(ok_values and ok_grad for ok_values, ok_grad in results)


def test_zigzag_split_and_unsplit_are_inverse():
    full = torch.randn(3, 40, 2)
    for cp_size in (1, 2, 4, 5):
        pieces = [zigzag_split(full, dim=1, cp_rank=r, cp_size=cp_size) for r in range(cp_size)]
        assert torch.equal(zigzag_unsplit(pieces, dim=1), full)
    assert zigzag_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert zigzag_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="divisible"):
        zigzag_split(full, dim=1, cp_rank=0, cp_size=3)


def test_chunk_pair_modes():
    assert chunk_pair_mode(3, 1) == "full"
    assert chunk_pair_mode(2, 2) == "diagonal"
    assert chunk_pair_mode(1, 3) == "skip"


def test_packed_padding_and_local_cu_seqlens():
    cu = torch.tensor([0, 5, 16, 23])
    padded = pad_packed_for_cp(cu, 2)
    assert padded.tolist() == [0, 8, 20, 28]
    assert local_cu_seqlens(padded, 2).tolist() == [0, 4, 10, 14]
    with pytest.raises(ValueError, match="multiple"):
        local_cu_seqlens(cu, 2)
    tokens = torch.arange(1, 24)
    local, local_cu = zigzag_split_packed(tokens, cu, dim=0, cp_rank=1, cp_size=2)
    # Sample 0 = [1..5, pad x3] -> chunks 1 and 2 of 4: [3, 4] + [5, 0].
    assert local[:4].tolist() == [3, 4, 5, 0]
    assert local_cu.tolist() == [0, 4, 10, 14]


class _FakeCPGroup:
    """Megatron's rotary helpers only ask a CP group for ``size()`` and ``rank()``."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


@pytest.fixture
def megatron_rope_on_cpu(monkeypatch):
    """megatron-core 0.16.1's ``get_pos_emb_on_this_cp_rank`` builds its index with
    ``pin_memory=True`` and ``.cuda()``, which a CPU-only build rejects; neutralise both here."""
    from megatron.core.models.common.embeddings import rope_utils

    real_tensor = torch.tensor
    view = types.ModuleType("torch")
    view.__dict__.update(torch.__dict__)
    view.tensor = lambda *args, pin_memory=False, **kwargs: real_tensor(*args, **kwargs)
    monkeypatch.setattr(rope_utils, "torch", view)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    return rope_utils


@pytest.mark.parametrize("cp_size", [2, 4])
def test_positions_match_megatron_rotary_slicing(megatron_rope_on_cpu, cp_size):
    seq_len = 6 * 2 * cp_size
    emb = torch.arange(seq_len, dtype=torch.float32).view(seq_len, 1, 1, 1)  # "embedding" = its position
    for rank in range(cp_size):
        sliced = megatron_rope_on_cpu.get_pos_emb_on_this_cp_rank(emb, 0, _FakeCPGroup(rank, cp_size))
        assert sliced.flatten().long().tolist() == zigzag_positions(seq_len, rank, cp_size).tolist()


@pytest.mark.parametrize("cp_size", [2, 4])
def test_packed_layout_matches_megatron_thd_rotary(cp_size):
    """RoPE applied with Megatron's thd path on our local shard == our shard of RoPE on the full batch."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from parallel import cpu_backend

    cpu_backend.activate()  # RotaryEmbedding.get_emb moves its buffer to torch.cuda.current_device()

    cu = torch.tensor([0, 5, 16, 23])
    cu_padded = pad_packed_for_cp(cu, cp_size)
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)
    freqs = rope(int((cu_padded[1:] - cu_padded[:-1]).max()))
    x = torch.randn(int(cu[-1]), 2, 8)
    # Without CP: rotate each sample (zero-padded like the CP shards) from position 0.
    full = _apply_rotary_pos_emb_thd(_pad_samples(x, cu, cu_padded), cu_padded, freqs, cp_group=_FakeCPGroup(0, 1))
    for rank in range(cp_size):
        local, _ = zigzag_split_packed(x, cu, dim=0, cp_rank=rank, cp_size=cp_size)
        rotated = _apply_rotary_pos_emb_thd(local, cu_padded, freqs, cp_group=_FakeCPGroup(rank, cp_size))
        expected, _ = zigzag_split_packed(full, cu_padded, dim=0, cp_rank=rank, cp_size=cp_size)
        torch.testing.assert_close(rotated, expected)


def _pad_samples(x, cu, cu_padded):
    """``x`` with each sample zero-padded to its length in ``cu_padded``."""
    out = x.new_zeros(int(cu_padded[-1]), *x.shape[1:])
    for i in range(len(cu) - 1):
        out[cu_padded[i]:cu_padded[i] + cu[i + 1] - cu[i]] = x[cu[i]:cu[i + 1]]
    return out


# ------------------------------------------------------------------ memory


def _saved_bytes_hooks(saved: dict):
    """Autograd hooks adding up the bytes of distinct storages saved for backward."""

    def pack(tensor):
        saved[id(tensor.untyped_storage())] = tensor.untyped_storage().nbytes()
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


def _memory_body(rank, world_size, seq_len):
    """Per CP size: bytes saved for backward, and peak live tensor bytes of one forward+backward."""
    _init(rank, world_size)
    # GQA as in the target models (Llama-3 / Qwen2 use 4-8 query heads per kv head).
    heads, kv_heads, head_dim = 8, 2, 32
    results = {}
    for cp_size in (1, 2, 4):
        cp_group = _cp_groups(world_size, cp_size)
        local = seq_len // cp_size
        q = torch.randn(local, 1, heads, head_dim, requires_grad=True)
        k, v = (torch.randn(local, 1, kv_heads, head_dim, requires_grad=True) for _ in range(2))
        saved = {}
        with PeakLiveBytes() as tracker:
            with _saved_bytes_hooks(saved):
                out = ring_attention(q, k, v, cp_group=cp_group, scale=head_dim ** -0.5)
            out.sum().backward()
        results[cp_size] = (sum(saved.values()), tracker.peak)
    return results


def test_activation_memory_falls_with_cp():
    """Saved activations are exactly O(local); the peak adds the ring's K/V and dK/dV buffers,
    also O(local), which is why the peak bound is loose."""
    results = run_distributed(_memory_body, world_size=4, args=(2048,), timeout=120)
    saved = {cp: max(ranks[cp][0] for ranks in results) for cp in (1, 2, 4)}
    peak = {cp: max(ranks[cp][1] for ranks in results) for cp in (1, 2, 4)}
    assert saved[2] <= 0.51 * saved[1] and saved[4] <= 0.51 * saved[2], saved
    assert peak[2] < 0.7 * peak[1] and peak[4] < 0.7 * peak[2], peak
