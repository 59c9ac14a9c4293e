"""Which attention kernel runs where, and the CUDA kernels torch itself ships (no flash-attn needed).

flash-attn has no wheel for every torch / CUDA pair (none for torch 2.13 + CUDA 13), so each
attention path has a torch-native CUDA kernel too:

- packed (``thd``) attention at CP=1: torch's own FlashAttention-2 varlen kernel
  (``aten._flash_attention_forward`` / ``_backward``, what ``torch.nn.attention.varlen`` wraps;
  the aten ops are called directly because that Python wrapper's arguments changed between torch
  releases, while the ops' positional arguments did not from 2.5 to 2.13) instead of one SDPA call
  per sample from Python;
- ring attention's blocks: torch's memory-efficient kernel, which returns the log-sum-exp the ring
  merge needs and takes the packed blocks' masks as an additive bias, instead of the explicit fp32
  score matrices of the math kernel.

The choices are pure functions of what is present (unit-tested on CPU with the facts faked); the
``*_here`` functions feed them this process's facts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel.optional_deps import probe

HALF = (torch.float16, torch.bfloat16)

def equal_head_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(q, k, v) zero-padded to one head size, for kernels that take only one (flash-attn, torch's CPU
    flash kernel): zero columns of q and k add nothing to the scores (the scale is passed explicitly)
    and zero columns of v give zero output columns, which :func:`trim_head_dim` drops."""
    size = max(q.shape[-1], v.shape[-1])
    return tuple(t if t.shape[-1] == size else F.pad(t, (0, size - t.shape[-1])) for t in (q, k, v))


def trim_head_dim(out: torch.Tensor, v_head_dim: int) -> torch.Tensor:
    return out if out.shape[-1] == v_head_dim else out[..., :v_head_dim]


# ----- the choices ----------------------------------------------------------------------------
PACKED_KERNELS = ("flash_attn_varlen", "torch_flash_varlen", "sdpa_per_sample")
RING_BLOCK_KERNELS = ("cpu_flash", "cuda_efficient", "math")


def choose_dense_kernel(*, device_type: str, dtype: torch.dtype, flash_attn: bool) -> str:
    """Padded ``[b, s, h, d]`` batches: flash-attn when it imports, else SDPA (which itself picks
    torch's flash / memory-efficient kernels on CUDA and its fused kernel on CPU)."""
    return "flash_attn" if flash_attn and device_type == "cuda" and dtype in HALF else "sdpa"


def choose_packed_kernel(*, device_type: str, dtype: torch.dtype, dropout_p: float, flash_attn: bool,
                         torch_flash_varlen: bool) -> str:
    """Packed ``[t, h, d]`` batches at CP=1. torch's varlen kernel is called without dropout (its RNG
    state would have to be carried to the backward): attention dropout keeps the per-sample loop."""
    if device_type == "cuda" and dtype in HALF:
        if flash_attn:
            return "flash_attn_varlen"
        if torch_flash_varlen and dropout_p == 0.0:
            return "torch_flash_varlen"
    return "sdpa_per_sample"


def choose_ring_flash_attn(*, device_type: str, dtype: torch.dtype, ring_flash_attn: bool) -> bool:
    """The whole ring handed to ring-flash-attn (its zigzag functions take our layout)."""
    return ring_flash_attn and device_type == "cuda" and dtype in HALF


def choose_ring_block_kernel(*, device_type: str, dtype: torch.dtype, cpu_flash: bool, cuda_efficient: bool) -> str:
    """One block of our own ring: a kernel returning the log-sum-exp without materialising scores
    where there is one (CPU: torch's fused flash kernel; CUDA: the memory-efficient one, for fp16,
    bf16 and fp32), else explicit math (fp32 / fp64 score matrices)."""
    if device_type == "cpu" and cpu_flash:
        return "cpu_flash"
    if device_type == "cuda" and cuda_efficient and dtype in (*HALF, torch.float32):
        return "cuda_efficient"
    return "math"


# ----- this process's facts ---------------------------------------------------------------------
_probes: dict[str, bool] = {}


def have(package: str) -> bool:
    """``flash_attn`` / ``ring_flash_attn`` import here (installed alone is not enough)."""
    if package not in _probes:
        _probes[package] = probe(package).importable
    return _probes[package]


def torch_flash_varlen_here(device: torch.device) -> bool:
    """torch's FlashAttention-2 runs on sm80+ (A100, H100, ...) builds with the op compiled in."""
    if device.type != "cuda" or VARLEN_FORWARD is None:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8 and torch.backends.cuda.flash_sdp_enabled()


CUDA_EFFICIENT_OPS = hasattr(torch.ops.aten, "_scaled_dot_product_efficient_attention_backward")


# ----- packed attention: torch's FlashAttention-2 varlen ----------------------------------------
# Module attributes so that a CPU test can put a reference with the same contract in.
VARLEN_FORWARD = getattr(torch.ops.aten, "_flash_attention_forward", None)
VARLEN_BACKWARD = getattr(torch.ops.aten, "_flash_attention_backward", None)


class _TorchFlashVarlen(torch.autograd.Function):
    """Causal attention inside each sample of ``[t, h, d]`` q and ``[t, kv_heads, d]`` k/v (GQA is
    native to FlashAttention-2); ``cu_seqlens`` int32 on the device."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_len: int, scale: float):
        q, k, v = (t.contiguous() for t in (q, k, v))
        out, lse, seed, offset, _ = VARLEN_FORWARD(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed, offset)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        dq, dk, dv = VARLEN_BACKWARD(
            dout.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True, seed, offset,
            scale=ctx.scale)
        return dq, dk, dv, None, None, None


def torch_flash_varlen(q, k, v, cu_seqlens: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Packed causal attention; tokens after ``cu_seqlens[-1]`` (padding) get zeros."""
    used = int(cu_seqlens[-1])
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    out = _TorchFlashVarlen.apply(q[:used], k[:used], v[:used], cu, max_len, scale)
    if used < q.shape[0]:
        out = torch.cat([out, out.new_zeros(q.shape[0] - used, *out.shape[1:])])
    return out


# ----- ring blocks: torch's memory-efficient kernel ----------------------------------------------
# The ops are module attributes so that a CPU test can put a reference with the same contract in.
EFFICIENT_FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)
EFFICIENT_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention_backward", None)
_BIAS_ALIGNMENT = 16  # the kernel wants the bias rows' stride a multiple of 16 elements (as SDPA pads)
_LSE_ROWS = 32  # it writes the log-sum-exp padded to a multiple of 32 query rows


def _expand_heads(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """GQA: the kernel wants as many k/v heads as q heads (query head i uses kv head i // group)."""
    group = q.shape[1] // kv.shape[1]
    return kv if group == 1 else kv.repeat_interleave(group, dim=1)


def _sum_heads(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, heads, m, d = grad.shape
    return grad if heads == kv_heads else grad.view(b, kv_heads, heads // kv_heads, m, d).sum(2)


def _bias(mask: torch.Tensor | None, q: torch.Tensor, m: int) -> torch.Tensor | None:
    """An additive ``[b, h, n, m]`` bias (0 / -inf) from a boolean ``[n, m]`` mask, broadcast over
    batch and heads, its rows stored with the stride the kernel accepts."""
    if mask is None:
        return None
    n = mask.shape[0]
    storage = q.new_zeros(n, -(-m // _BIAS_ALIGNMENT) * _BIAS_ALIGNMENT)[:, :m]
    storage.masked_fill_(~mask, float("-inf"))
    return storage.expand(q.shape[0], q.shape[1], n, m)


def efficient_block_forward(q, k, v, *, causal: bool, mask, scale: float):
    """(out, lse [b, h, n] fp32) of q ``[b, h, n, d]`` against k/v ``[b, kv_heads, m, d]``."""
    out, lse, _, _ = EFFICIENT_FORWARD(q, _expand_heads(q, k), _expand_heads(q, v), _bias(mask, q, k.shape[2]),
                                       True, 0.0, causal, scale=scale)
    return out, lse[..., :q.shape[2]].float()


def efficient_block_backward(q, k, v, *, causal: bool, mask, scale: float, dout, out, lse):
    """(dq, dk, dv) of one block given the GLOBAL ``out`` / ``lse`` of its rows (any dtype)."""
    n = q.shape[2]
    lse = F.pad(lse.float(), (0, -n % _LSE_ROWS)).contiguous()
    no_rng = torch.empty(0, dtype=torch.int64, device=q.device)  # dropout 0: the kernel reads no RNG state
    dq, dk, dv, _ = EFFICIENT_BACKWARD(
        dout.to(q.dtype).contiguous(), q, _expand_heads(q, k), _expand_heads(q, v), _bias(mask, q, k.shape[2]),
        out.to(q.dtype).contiguous(), lse, no_rng, no_rng, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, _sum_heads(dk, k.shape[1]), _sum_heads(dv, k.shape[1])
