"""Per-token quantities from logits sharded over the vocabulary (TP), without gathering them."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """log p(label) per position from ``[b, s, vocab/TP]`` logits; differentiable.

    ``logits`` are left intact: megatron-core 0.16.1's vocab-parallel cross entropy subtracts the
    max and exponentiates in place on its argument, which for fp32 logits would otherwise be the
    caller's tensor (later entropy or KD terms would read garbage).
    """
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    if scaled.data_ptr() == logits.data_ptr():
        scaled = scaled.clone()
    return -tensor_parallel.vocab_parallel_cross_entropy(scaled, labels)


def token_entropy(logits: torch.Tensor, tp_group, *, temperature: float = 1.0,
                  differentiable: bool = False) -> torch.Tensor:
    """Entropy of the full-vocabulary softmax per position, from ``[b, s, vocab/TP]`` logits.

    A metric (no gradient) unless ``differentiable`` (the entropy bonus): then its gradient with
    respect to this rank's vocabulary shard is exact, as for the vocab-parallel cross entropy."""
    if not differentiable:
        with torch.no_grad():
            return _entropy(logits, tp_group, temperature, _all_reduce_in_place)
    return _entropy(logits, tp_group, temperature, _ReduceFromTensorParallel.apply)


def _entropy(logits: torch.Tensor, tp_group, temperature: float, reduce) -> torch.Tensor:
    logits = logits.float() / temperature
    local_max = logits.detach().max(dim=-1).values
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits - global_max.unsqueeze(-1)
    exp = shifted.exp()
    # Masked vocabulary padding holds -inf logits: their term p * logit is 0, not 0 * -inf = nan
    # (and the logit is zeroed before the product, so the backward sends no nan either).
    finite = shifted.masked_fill(exp == 0, 0.0)
    sums = reduce(torch.stack([exp.sum(-1), (exp * finite).sum(-1)]), tp_group)
    normaliser, weighted = sums[0], sums[1]
    # H = log Z - E[shifted logit]
    return normaliser.log() - weighted / normaliser


def _all_reduce_in_place(tensor: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(tensor, group=group)
    return tensor


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Sum over the TP ranks; the backward is the identity (Megatron's
    ``reduce_from_tensor_model_parallel_region`` with the group passed in): every TP rank computes
    the same loss from the sum, and the gradient of its own shard is that loss's."""

    @staticmethod
    def forward(ctx, tensor, group):
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None
