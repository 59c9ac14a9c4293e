"""Per-sequence quantities from this rank's Megatron output, exact under TP / CP.

Preference losses (RM, DPO, KTO) are functions of whole sequences, but under context
parallelism each CP rank holds only its zigzag share of every sequence. Both helpers give every
CP rank the full per-sequence value, differentiably; a loss built from them must then be
divided by ``cp_size`` on each rank (``context_parallel_share``), because Megatron sums the CP
ranks' gradients.
"""
from __future__ import annotations

import torch

from engine.runtime.per_sequence import context_parallel_share, sequence_sums
from engine.runtime.vocab_parallel import token_log_probs
from parallel.context_parallel import zigzag_gather

__all__ = ["context_parallel_share", "last_token_values", "sequence_log_probs"]


def sequence_log_probs(logits: torch.Tensor, batch: dict, *, cp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` per sequence of the label log-probs over ``loss_mask`` (the response tokens).

    ``logits`` are vocab-parallel ``[rows, s_local, vocab/TP]`` (one row when packed); the sums
    cover the whole sequence on every CP rank and keep their gradient.
    """
    mask = batch["loss_mask"].float()
    per_token = torch.stack([token_log_probs(logits, batch["labels"]) * mask, mask])
    total = sequence_sums(per_token, batch, cp_group=cp_group)
    return total[0], total[1].detach()


def last_token_values(values: torch.Tensor, batch: dict, *, cp_group) -> torch.Tensor:
    """Value-head output ``[rows, s_local, 1]`` read at each sequence's last token (its eos)."""
    if "last_token" in batch:  # packed: each sequence's last token is marked
        marked = values[..., 0].float() * batch["last_token"].to(values.device)
        return sequence_sums(marked, batch, cp_group=cp_group)
    full = zigzag_gather(values[..., 0].float(), dim=1, cp_group=cp_group)
    return full.gather(1, batch["last_index"].to(full.device).unsqueeze(1)).squeeze(1)
