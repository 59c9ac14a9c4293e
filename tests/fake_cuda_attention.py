"""CPU stand-ins for the CUDA-only aten attention ops that ``parallel.attention.kernels`` calls, with
the same arguments, outputs and restrictions (checked), computed by torch's CPU flash kernel.

They prove our glue around the real ops on CPU: GQA heads expanded and their gradients summed,
the log-sum-exp's padded rows dropped and restored, the bias's aligned stride, int32 boundaries,
trailing padding. The kernels' own numerics are torch's; tools/device_check.py runs them on a GPU.
"""
from __future__ import annotations

import contextlib

import torch

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_LSE_ROWS = 32


def _check_efficient_inputs(q, k, v, bias):
    # The memory-efficient kernel has no GQA: as many k/v heads as q heads.
    assert q.shape[:2] == k.shape[:2] == v.shape[:2], (q.shape, k.shape, v.shape)
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    if bias is not None:
        assert bias.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), bias.shape
        assert bias.dtype == q.dtype and bias.stride(-2) % 16 == 0, (bias.dtype, bias.stride())


def efficient_forward(q, k, v, bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale=None):
    _check_efficient_inputs(q, k, v, bias)
    assert compute_log_sumexp and dropout_p == 0.0
    out, lse = _FLASH(q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale)
    n = q.shape[2]
    # The real kernel pads the lse to a multiple of 32 rows with values nobody should read.
    padded = torch.full((*lse.shape[:2], -(-n // _LSE_ROWS) * _LSE_ROWS), float("nan"))
    padded[..., :n] = lse
    empty = torch.empty(0, dtype=torch.int64)
    return out, padded, empty, empty


def efficient_backward(dout, q, k, v, bias, out, lse, seed, offset, dropout_p, grad_input_mask, is_causal=False,
                       *, scale=None):
    _check_efficient_inputs(q, k, v, bias)
    n = q.shape[2]
    assert lse.dtype == torch.float32 and lse.shape[-1] % _LSE_ROWS == 0 and lse.shape[-1] >= n, lse.shape
    assert dout.dtype == out.dtype == q.dtype and list(grad_input_mask) == [True, True, True, False]
    dq, dk, dv = _FLASH_BACKWARD(dout, q, k, v, out, lse[..., :n].contiguous(), 0.0, is_causal,
                                 attn_mask=bias, scale=scale)
    return dq, dk, dv, None


def _samples(cu):
    bounds = cu.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _heads_first(x, start, end):
    return x[start:end].transpose(0, 1).unsqueeze(0)  # [n, h, d] -> [1, h, n, d]


def varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *, scale=None):
    """FlashAttention-2 varlen: [t, h, d] q, [t, kv_heads, d] k/v (GQA native), lse [h, t]."""
    assert cu_q.dtype == cu_k.dtype == torch.int32 and torch.equal(cu_q, cu_k)
    assert int(cu_q[-1]) == q.shape[0] == k.shape[0] and dropout_p == 0.0 and is_causal
    out, lse = torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    for start, end in _samples(cu_q):
        o, s = _FLASH(*(_heads_first(t, start, end) for t in (q, k, v)), 0.0, True, scale=scale)
        out[start:end], lse[:, start:end] = o[0].transpose(0, 1), s[0]
    empty = torch.empty(0, dtype=torch.int64)
    return out, lse, empty, empty, empty


def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, seed, offset,
                    *, scale=None):
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    for start, end in _samples(cu_q):
        args = [_heads_first(t, start, end) for t in (dout, q, k, v, out)]
        parts = _FLASH_BACKWARD(*args, lse[None, :, start:end].contiguous(), 0.0, True, scale=scale)
        for grad, part in zip(grads, parts):
            grad[start:end] = part[0].transpose(0, 1)
    return tuple(grads)


@contextlib.contextmanager
def cuda_kernels_on_cpu():
    """Put the stand-ins where ``parallel.attention.kernels`` calls the real ops, and make the ring
    pick its CUDA block kernel on CPU."""
    from parallel.attention import kernels, ring

    saved = {name: getattr(kernels, name) for name in
             ("EFFICIENT_FORWARD", "EFFICIENT_BACKWARD", "VARLEN_FORWARD", "VARLEN_BACKWARD")}
    saved_block_kernel = ring.block_kernel
    kernels.EFFICIENT_FORWARD, kernels.EFFICIENT_BACKWARD = efficient_forward, efficient_backward
    kernels.VARLEN_FORWARD, kernels.VARLEN_BACKWARD = varlen_forward, varlen_backward
    ring.block_kernel = lambda device, dtype: "cuda_efficient"
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)
        ring.block_kernel = saved_block_kernel
