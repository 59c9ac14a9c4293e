"""Samples -> right-padded batches ``[B, L]``, with next-token labels.

Label-shift convention (every collate here, padded and packed):
- the model reads ``input_ids[t]`` at position ``t`` and is trained to predict token ``t+1``;
- ``labels[t] = input_ids[t+1]`` and ``loss_mask[t] = sample_loss_mask[t+1]``, where the
  sample's ``loss_mask`` marks the tokens to learn (response tokens and eos). So the last
  prompt position, whose target is the first response token, is in the loss, and the last
  position of a sample, which has no next token, never is (its label is ``pad_id``);
- the per-token loss is ``cross_entropy(logits[:, t], labels[:, t]) * loss_mask[:, t]``:
  no shifting is left to the trainer. Labels are always valid token ids (never -100), as
  Megatron's vocab-parallel cross entropy wants.
- packed batches shift every sample on its own, so a sample's last position never gets the
  next sample's first token as its label.
"""
from __future__ import annotations

import torch


def next_token_targets(input_ids: list[int], loss_mask: list[int], *, pad_id: int) -> tuple[list[int], list[int]]:
    """``(labels, label_mask)`` of one sample: both shifted left by one, the end padded."""
    if len(input_ids) != len(loss_mask):
        raise ValueError(f"a sample has {len(input_ids)} input_ids but {len(loss_mask)} loss_mask entries")
    return list(input_ids[1:]) + [pad_id], list(loss_mask[1:]) + [0]


def padded_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (sequence parallel: TP; CP: 2 x CP)."""
    if multiple < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {multiple}")
    return -(-length // multiple) * multiple


def pad_collate(samples: list[dict], pad_id: int, *, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad samples (``input_ids``, ``loss_mask``) into one batch.

    Returns ``input_ids``, ``labels`` (long ``[B, L]``), ``loss_mask`` (float32 ``[B, L]``,
    aligned with ``labels``), ``attention_mask`` (long, 1 on real tokens), ``position_ids``
    (long, ``0..L-1`` on every row). ``L`` is the longest sample rounded up to
    ``pad_to_multiple_of``.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    width = padded_length(max(len(s["input_ids"]) for s in samples), pad_to_multiple_of)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, pad_id)
    loss_mask = torch.zeros(len(samples), width, dtype=torch.float32)
    attention_mask = torch.zeros_like(input_ids)
    for row, sample in enumerate(samples):
        ids = list(sample["input_ids"])
        targets, target_mask = next_token_targets(ids, sample["loss_mask"], pad_id=pad_id)
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids)
        labels[row, :n] = torch.tensor(targets)
        loss_mask[row, :n] = torch.tensor(target_mask, dtype=torch.float32)
        attention_mask[row, :n] = 1
    position_ids = torch.arange(width).expand(len(samples), width).contiguous()
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
            "attention_mask": attention_mask, "position_ids": position_ids}


def preference_collate(samples: list[dict], pad_id: int, *, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Pairs -> one padded batch of ``2B`` rows: the ``B`` chosen sequences, then the ``B``
    rejected ones (in the same order), with loss masks on the responses (after ``prompt_len``).

    Returns the ``pad_collate`` keys plus ``margin`` and ``pair_mask`` (float32 ``[B]``, ones:
    the pair count the loss is normalised by) and ``last_index`` (long ``[2B]``: each row's
    eos, where a reward model reads its score).
    """
    rows = [response_sample(s["chosen_ids"], s["prompt_len"]) for s in samples]
    rows += [response_sample(s["rejected_ids"], s["prompt_len"]) for s in samples]
    batch = pad_collate(rows, pad_id, pad_to_multiple_of=pad_to_multiple_of)
    batch["margin"] = torch.tensor([float(s.get("margin", 0.0)) for s in samples], dtype=torch.float32)
    batch["pair_mask"] = torch.ones(len(samples), dtype=torch.float32)
    batch["last_index"] = batch["attention_mask"].sum(dim=1) - 1
    return batch


def response_sample(input_ids: list[int], prompt_len: int) -> dict:
    """A prompt + response sequence with the loss on the response only."""
    return {"input_ids": input_ids, "loss_mask": [0] * prompt_len + [1] * (len(input_ids) - prompt_len)}
