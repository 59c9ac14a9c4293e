"""Masked reductions of per-token tensors, shared by the offline trainers' and the RL losses."""
from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is nonzero (weighted by ``mask``).

    Where the mask is all zero the result is 0, not NaN, and so is its gradient.
    """
    if mask is None:
        return x.mean() if dim is None else x.mean(dim=dim)
    mask = mask.to(x.dtype)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim=dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    # Dividing by 1 where nothing is counted keeps the (zero) numerator and a finite gradient.
    return total / torch.where(count > 0, count, torch.ones_like(count))


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    token_level_loss: bool = True,
    normaliser: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    ``token_level_loss=True``: masked sum over all tokens / ``normaliser`` (default: the number
    of real tokens here). ``False``: each sequence's masked token mean, summed over sequences /
    ``normaliser`` (default: the number of sequences with at least one real token).
    """
    if mask is None:
        mask = torch.ones_like(per_token_loss)
    mask = mask.to(per_token_loss.dtype)
    if token_level_loss:
        if normaliser is None:
            return masked_mean(per_token_loss, mask)
        return (per_token_loss * mask).sum() / normaliser
    sequence_loss = masked_mean(per_token_loss, mask, dim=-1)
    if normaliser is None:
        return masked_mean(sequence_loss, (mask.sum(dim=-1) > 0).to(mask.dtype))
    return sequence_loss.sum() / normaliser
