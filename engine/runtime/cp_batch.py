"""Cut a micro-batch into this context-parallel rank's zigzag share of every per-token tensor.

Padded batches: each ``[b, s]`` tensor keeps chunks ``r`` and ``2C-1-r`` of ``2C`` along the
sequence. Packed batches (``cu_seqlens``): every sample is padded to a multiple of ``2C`` and
split on its own; the batch then carries the global padded boundaries, which Megatron's rotary
embedding and our ring attention divide by C for the local layout.
"""
from __future__ import annotations

import torch

from parallel.context_parallel import pad_packed_for_cp, zigzag_split, zigzag_split_packed

PER_TOKEN_KEYS = ("input_ids", "labels", "loss_mask", "position_ids", "action_mask", "old_log_probs",
                  "advantages", "returns", "values", "ref_log_probs", "teacher_log_probs", "attention_mask",
                  "sequence_index", "last_token",
                  "rollout_log_probs", "aggregation_weights", "routed_experts")


def split_for_context_parallel(batch: dict, *, cp_rank: int, cp_size: int) -> dict:
    if cp_size == 1:
        return batch
    out = dict(batch)
    cu_seqlens = batch.get("cu_seqlens")
    for key in PER_TOKEN_KEYS:
        tensor = batch.get(key)
        if not torch.is_tensor(tensor) or tensor.dim() < 2:
            continue
        if cu_seqlens is None:
            out[key] = zigzag_split(tensor, dim=1, cp_rank=cp_rank, cp_size=cp_size)
        else:
            out[key], _ = zigzag_split_packed(tensor, cu_seqlens, dim=1, cp_rank=cp_rank, cp_size=cp_size)
    if cu_seqlens is not None:
        out["cu_seqlens_padded"] = pad_packed_for_cp(cu_seqlens.to(torch.int32), cp_size)
    return out
