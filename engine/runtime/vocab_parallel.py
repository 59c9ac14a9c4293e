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


@torch.no_grad()
def token_entropy(logits: torch.Tensor, tp_group, *, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the full-vocabulary softmax per position (a metric: no gradient)."""
    logits = logits.float() / temperature
    local_max = logits.max(dim=-1).values
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits - global_max.unsqueeze(-1)
    exp = shifted.exp()
    # Masked vocabulary padding holds -inf logits: their term p * logit is 0, not 0 * -inf = nan.
    weighted_terms = torch.where(exp > 0, exp * shifted, torch.zeros_like(shifted))
    sums = torch.stack([exp.sum(-1), weighted_terms.sum(-1)])
    dist.all_reduce(sums, group=tp_group)
    normaliser, weighted = sums[0], sums[1]
    # H = log Z - E[shifted logit]
    return normaliser.log() - weighted / normaliser
