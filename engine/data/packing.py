"""Sample packing: several samples in one ``[1, T]`` row, kept apart by ``cu_seqlens``.

``pack_samples`` groups whole samples (never split) into packs of at most ``max_len`` tokens;
``packed_collate`` lays a pack out for Megatron's ``thd`` format (``PackedSeqParams``):
``cu_seqlens = [0, len_0, len_0 + len_1, ...]`` (int32, one more entry than samples),
``position_ids`` restarting at 0 in every sample, and labels shifted within each sample
(see the convention in ``collate.py``), so no label crosses from one sample into the next.
Padding for ``pad_to_multiple_of`` goes after the last sample and is outside every sample:
``cu_seqlens[-1]`` is the real token count, ``T`` may be larger.
"""
from __future__ import annotations

import torch

from engine.data.collate import next_token_targets, padded_length


def pack_samples(samples: list[dict], max_len: int) -> list[list[dict]]:
    """Group samples into packs of at most ``max_len`` tokens, first-fit decreasing.

    Longest first (ties in input order), each into the first pack with room: deterministic,
    and close to the fewest packs. A sample longer than ``max_len`` is an error, since
    datasets already cut samples to ``--max_len``.
    """
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i]["input_ids"]), i))
    packs: list[list[dict]] = []
    room: list[int] = []
    for index in order:
        length = len(samples[index]["input_ids"])
        if length > max_len:
            raise ValueError(f"a sample of {length} tokens does not fit a pack of --max_len {max_len} tokens")
        target = next((p for p, free in enumerate(room) if length <= free), None)
        if target is None:
            packs.append([])
            room.append(max_len)
            target = len(packs) - 1
        packs[target].append(samples[index])
        room[target] -= length
    return packs


def packed_collate(pack: list[dict], *, pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """One pack -> ``input_ids``, ``labels``, ``position_ids`` (long ``[1, T]``), ``loss_mask``
    (float32 ``[1, T]``, aligned with ``labels``) and ``cu_seqlens`` (int32 ``[len(pack) + 1]``)."""
    if not pack:
        raise ValueError("cannot collate an empty pack")
    ids, labels, mask, positions, bounds = [], [], [], [], [0]
    for sample in pack:
        sample_ids = list(sample["input_ids"])
        targets, target_mask = next_token_targets(sample_ids, sample["loss_mask"], pad_id=pad_id)
        ids += sample_ids
        labels += targets
        mask += target_mask
        positions += range(len(sample_ids))
        bounds.append(bounds[-1] + len(sample_ids))
    pad = padded_length(len(ids), pad_to_multiple_of) - len(ids)
    return {
        "input_ids": torch.tensor([ids + [pad_id] * pad], dtype=torch.long),
        "labels": torch.tensor([labels + [pad_id] * pad], dtype=torch.long),
        "loss_mask": torch.tensor([mask + [0] * pad], dtype=torch.float32),
        "position_ids": torch.tensor([positions + list(range(pad))], dtype=torch.long),
        "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
    }
