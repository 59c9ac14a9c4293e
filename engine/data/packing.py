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

from engine.data.collate import next_token_targets, padded_length, response_sample


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


def pack_padded_rows(batch: dict, *, multiple: int = 1) -> dict:
    """A right-padded micro-batch (rows ``[b, L]`` with ``attention_mask`` 1 on each row's real
    tokens, labels already shifted within each row) as one packed ``[1, T]`` row.

    Every per-token tensor (``[b, L, ...]``) keeps each row's real tokens, back to back;
    ``position_ids`` restart at 0 in every sample; ``cu_seqlens`` holds the boundaries. The
    padding for ``multiple`` goes after the last sample, outside every sample (as in
    ``packed_collate``). The inverse of the forward's per-token outputs: ``unpack_to_rows``.
    """
    ids = batch["input_ids"]
    rows, width = ids.shape
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    if min(lengths) < 1:
        raise ValueError("cannot pack a row with no real tokens")
    real = sum(lengths)
    pad = padded_length(real, multiple) - real
    out = {}
    for key, tensor in batch.items():
        if not (torch.is_tensor(tensor) and tensor.dim() >= 2 and tuple(tensor.shape[:2]) == (rows, width)):
            out[key] = tensor
            continue
        pieces = [tensor[row, :length] for row, length in enumerate(lengths)]
        pieces.append(tensor.new_zeros((pad, *tensor.shape[2:])))
        out[key] = torch.cat(pieces)[None]
    out["position_ids"] = torch.cat([torch.arange(n) for n in (*lengths, pad)])[None]
    out["attention_mask"] = torch.cat([torch.ones(real, dtype=torch.long), torch.zeros(pad, dtype=torch.long)])[None]
    out["cu_seqlens"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return out


def unpack_to_rows(packed: torch.Tensor, cu_seqlens: torch.Tensor, width: int) -> torch.Tensor:
    """Per-token values of a packed row (``[1, T, ...]``) back as right-padded rows ``[b, width, ...]``
    (zeros after each sample's tokens)."""
    bounds = cu_seqlens.tolist()
    out = packed.new_zeros((len(bounds) - 1, width, *packed.shape[2:]))
    for row, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        out[row, :stop - start] = packed[0, start:stop]
    return out


def preference_packed_collate(samples: list[dict], pad_id: int, *, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Pairs -> the ``2B`` sequences of ``preference_collate`` (chosen, then rejected) packed into one
    ``[1, T]`` row (``packing.packed_collate``): no padding between sequences.

    Per-sequence values are read through ``packed_sequences_collate``'s keys (``last_token``: where
    a reward model reads its score). ``margin`` and ``pair_mask`` as in ``preference_collate``.
    """
    rows = [response_sample(s["chosen_ids"], s["prompt_len"]) for s in samples]
    rows += [response_sample(s["rejected_ids"], s["prompt_len"]) for s in samples]
    batch = packed_sequences_collate(rows, pad_id, pad_to_multiple_of=pad_to_multiple_of)
    batch.update(margin=torch.tensor([float(s.get("margin", 0.0)) for s in samples], dtype=torch.float32),
                 pair_mask=torch.ones(len(samples), dtype=torch.float32))
    return batch


def packed_sequences_collate(samples: list[dict], pad_id: int, *, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """``packing.packed_collate`` of whole sequences whose per-sequence values the trainers read:
    plus ``sequence_index`` (long ``[1, T]``: which sample a token belongs to, ``len(samples)`` on
    the padding after the last), ``last_token`` (float ``[1, T]``: 1 at each sample's last token)
    and ``num_sequences``."""
    batch = packed_collate(samples, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
    width = batch["input_ids"].shape[1]
    sequence_index = torch.full((1, width), len(samples), dtype=torch.long)
    last_token = torch.zeros(1, width, dtype=torch.float32)
    bounds = batch["cu_seqlens"].tolist()
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        sequence_index[0, start:end] = index
        last_token[0, end - 1] = 1.0
    batch.update(sequence_index=sequence_index, last_token=last_token, num_sequences=torch.tensor(len(samples)))
    return batch
