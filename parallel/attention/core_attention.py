"""Core attention for the Megatron layer spec: softmax(q k^T) v on whatever kernel is present.

Megatron's ``SelfAttention`` computes q/k/v (with rotary applied) and hands them to this module:
``[s, b, heads, head_dim]`` for padded batches, ``[t, heads, head_dim]`` for packed (``thd``)
batches described by ``PackedSeqParams.cu_seqlens_q``. The output is ``[s, b, heads*v_head_dim]``
(packed: ``[t, heads*v_head_dim]``); ``v_head_dim`` may differ from the q/k head size (multi-head
latent attention: DeepSeek's q/k heads carry a rotary part that v lacks). Kernel choice, in order:
ring attention when the context parallel group has more than one rank, flash-attn on CUDA for
fp16/bf16 when it imports, else PyTorch's own kernels: SDPA for padded batches (flash / memory-efficient on CUDA, its fused kernel
on CPU) and, for packed batches on CUDA, torch's FlashAttention-2 varlen kernel
(``parallel.attention.kernels``); one SDPA call per sample elsewhere.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from parallel.attention import kernels


def _flash_attn_here(q: torch.Tensor) -> bool:
    # Probed (imported) only where it could run: a CPU process never tries to load a CUDA extension.
    return q.is_cuda and q.dtype in kernels.HALF and kernels.have("flash_attn")


def dense_kernel(q: torch.Tensor) -> str:
    """The kernel of a padded batch here (``kernels.choose_dense_kernel``)."""
    return kernels.choose_dense_kernel(device_type=q.device.type, dtype=q.dtype, flash_attn=_flash_attn_here(q))


def packed_kernel(q: torch.Tensor, dropout_p: float) -> str:
    """The kernel of a packed batch here (``kernels.choose_packed_kernel``)."""
    return kernels.choose_packed_kernel(device_type=q.device.type, dtype=q.dtype, dropout_p=dropout_p,
                                        flash_attn=_flash_attn_here(q),
                                        torch_flash_varlen=kernels.torch_flash_varlen_here(q.device))


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, dropout_p: float = 0.0):
    """Causal attention on ``[b, s, h, d]`` tensors with grouped k/v heads; returns ``[b, s, h, d_v]``."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)


def packed_causal(q, k, v, cu_seqlens: torch.Tensor, *, scale: float, dropout_p: float = 0.0):
    """Causal attention inside each sample of a packed ``[t, h, d]`` batch; nothing crosses samples."""
    kernel = packed_kernel(q, dropout_p)
    if kernel != "sdpa_per_sample" and v.shape[-1] != q.shape[-1]:
        out = packed_causal(*kernels.equal_head_dims(q, k, v), cu_seqlens, scale=scale, dropout_p=dropout_p)
        return kernels.trim_head_dim(out, v.shape[-1])
    if kernel == "flash_attn_varlen":
        from flash_attn import flash_attn_varlen_func

        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        cu = cu_seqlens.to(torch.int32)
        return flash_attn_varlen_func(
            q, k, v, cu, cu, max_len, max_len, dropout_p=dropout_p, softmax_scale=scale, causal=True
        )
    if kernel == "torch_flash_varlen":
        return kernels.torch_flash_varlen(q, k, v, cu_seqlens, scale=scale)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            out[start:end] = sdpa_causal(
                q[None, start:end], k[None, start:end], v[None, start:end], scale=scale, dropout_p=dropout_p
            )[0]
    # Tokens after the last boundary are padding: keep them finite and out of every sample.
    if bounds[-1] < q.shape[0]:
        out[bounds[-1]:] = 0
    return out


def _local_cu_seqlens(packed_seq_params, cp_size: int) -> torch.Tensor:
    """This CP rank's sample boundaries. Megatron's ``PackedSeqParams`` hold the GLOBAL ones (its
    ``thd`` rotary divides them by the CP size); ring attention wants the local ones."""
    from parallel.context_parallel import local_cu_seqlens

    padded = packed_seq_params.cu_seqlens_q_padded
    return local_cu_seqlens(padded if padded is not None else packed_seq_params.cu_seqlens_q, cp_size)


class CoreAttention(MegatronModule):
    """Drop-in ``core_attention`` for Megatron's ``SelfAttention`` (causal decoder models)."""

    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type,
        attention_dropout=None,
        softmax_scale=None,
        cp_comm_type=None,
        pg_collection=None,
        ring_head_stride: int | None = None,
        **kwargs,
    ):
        """``ring_head_stride`` (``--ring_head_stride``, from the layer spec's params): KV heads
        per ring pass under context parallelism (None: all at once)."""
        super().__init__(config=config)
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.ring_head_stride = ring_head_stride

    def _context_parallel(self) -> bool:
        return self.cp_group is not None and self.cp_group.size() > 1

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
        **kwargs,
    ):
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by CoreAttention")
        dropout_p = self.dropout_p if self.training else 0.0
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if self._context_parallel():
            from parallel.attention.ring import ring_attention

            return ring_attention(
                query, key, value,
                cp_group=self.cp_group,
                scale=self.softmax_scale,
                cu_seqlens=_local_cu_seqlens(packed_seq_params, self.cp_group.size()) if packed else None,
                head_stride=self.ring_head_stride,
            ).flatten(-2)
        if packed:
            out = packed_causal(
                query, key, value, packed_seq_params.cu_seqlens_q, scale=self.softmax_scale, dropout_p=dropout_p
            )
            return out.flatten(-2)
        # [s, b, h, d] -> [b, s, h, d]
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        if dense_kernel(q) == "flash_attn":
            from flash_attn import flash_attn_func

            out = flash_attn_func(*kernels.equal_head_dims(q, k, v), dropout_p=dropout_p, softmax_scale=self.softmax_scale,
                                  causal=True)
            out = kernels.trim_head_dim(out, v.shape[-1])
        else:
            out = sdpa_causal(q, k, v, scale=self.softmax_scale, dropout_p=dropout_p)
        return out.transpose(0, 1).flatten(-2)
