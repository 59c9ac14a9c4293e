"""Rollouts (prompt ids + sampled response ids) as the padded, label-aligned batch every role reads.

Layout, the same as the SFT collate's: row ``i`` is ``prompt + response`` right-padded to ``L``;
``labels[t] = input_ids[t+1]``; per-token RL quantities (log-probs, values, advantages, ...) sit
at the position ``t`` whose *label* is the token they are about, and ``action_mask[t] = 1``
exactly when ``labels[t]`` is a response token that trains (every response token unless the sample
carries a loss mask). A response token's log-prob is thus read from
the logits at the position before it, and the value there is the state value before the action.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [B, L] long
    labels: torch.Tensor  # [B, L] long, input_ids shifted left
    action_mask: torch.Tensor  # [B, L] float, 1 where labels[t] is a response token
    position_ids: torch.Tensor  # [B, L] long
    prompt_lengths: torch.Tensor  # [B] long
    response_lengths: torch.Tensor  # [B] long
    rollout_log_probs: torch.Tensor | None = None  # [B, L] vLLM's log-probs of the sampled tokens
    # [B, L, layers, top_k] int16: the engines' routing of each token, expert id + 1 (0: not recorded;
    # models.router_replay), aligned with input_ids
    routed_experts: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def last_token_index(self) -> torch.Tensor:
        """Index of each row's last real token (the reward model scores there)."""
        return self.prompt_lengths + self.response_lengths - 1


def build_rollout_batch(
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    *,
    pad_id: int,
    response_log_probs: list[list[float]] | None = None,
    response_loss_masks: list[list[float] | None] | None = None,
    routed_experts: list | None = None,
    pad_to_multiple_of: int = 1,
) -> RolloutBatch:
    """Pack rollouts (one prompt per response; repeat prompts for n samples) into a RolloutBatch.

    ``response_loss_masks`` (per response, per response token; None: all trained): ``action_mask``
    is 0 on the tokens whose mask is 0, which are then left out of every loss, normaliser and
    advantage (``engine.rl.rollout.RolloutSample.trained_tokens``)."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(response_ids)} responses")
    if response_loss_masks is not None and len(response_loss_masks) != len(response_ids):
        raise ValueError(f"{len(response_loss_masks)} loss masks for {len(response_ids)} responses")
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    width = -(-max(lengths) // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(prompt_ids)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    action_mask = torch.zeros(batch, width)
    rollout_log_probs = torch.zeros(batch, width) if response_log_probs is not None else None
    for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        sequence = list(prompt) + list(response)
        input_ids[i, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        first, last = len(prompt) - 1, len(sequence) - 1  # label positions of the response tokens
        action_mask[i, first:last] = 1.0
        masked = response_loss_masks[i] if response_loss_masks is not None else None
        if masked is not None:
            if len(masked) != len(response):
                raise ValueError(f"response {i}: a loss mask of {len(masked)} entries for {len(response)} tokens")
            action_mask[i, first:last] = torch.tensor(masked, dtype=torch.float32)
        if rollout_log_probs is not None and response:
            rollout_log_probs[i, first:last] = torch.tensor(response_log_probs[i], dtype=torch.float32)
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = pad_id
    return RolloutBatch(
        input_ids=input_ids,
        labels=labels,
        action_mask=action_mask,
        position_ids=torch.arange(width).expand(batch, width).contiguous(),
        prompt_lengths=torch.tensor([len(p) for p in prompt_ids]),
        response_lengths=torch.tensor([len(r) for r in response_ids]),
        rollout_log_probs=rollout_log_probs,
        routed_experts=_routing_rows(routed_experts, lengths, width) if routed_experts is not None else None,
    )


def _routing_rows(records: list, lengths: list[int], width: int) -> torch.Tensor | None:
    """Per-sample engine routing (``[tokens, layers, k]`` expert ids, -1: none) as ``[B, width, layers, k]``
    record entries (expert id + 1, 0: none), row ``t`` the token at ``input_ids[:, t]``."""
    present = [r for r in records if r is not None]
    if not present:
        return None
    shape = torch.as_tensor(present[0]).shape[1:]
    out = torch.zeros((len(records), width, *shape), dtype=torch.int16)
    for i, (record, length) in enumerate(zip(records, lengths)):
        if record is None:
            continue
        record = torch.as_tensor(record)
        if record.shape[1:] != shape or record.shape[0] > length:
            raise ValueError(f"sample {i}: a routing record of shape {tuple(record.shape)} for {length} tokens "
                             f"(expected at most [{length}, {', '.join(map(str, shape))}])")
        out[i, :record.shape[0]] = record.to(torch.int16) + 1
    return out


def trim_to_content(batch: dict, *, multiple: int = 1, mask_key: str = "action_mask", label_aligned: bool = True) -> dict:
    """Drop trailing all-padding columns of a micro-batch (rows are right-padded): those after
    the last position ``mask_key`` marks (``label_aligned``: a label position, whose token is at
    ``t + 1``; else a token position, as ``attention_mask``)."""
    nonzero = batch[mask_key].nonzero()
    after = 2 if label_aligned else 1
    used = int(nonzero[:, 1].max()) + after if len(nonzero) else 1
    used = min(batch["input_ids"].shape[1], used)
    width = -(-used // multiple) * multiple  # may be wider than the rows: padded with zeros then
    out = {k: _fit_columns(v, width) if torch.is_tensor(v) and v.dim() >= 2 else v for k, v in batch.items()}
    if "position_ids" in out:
        out["position_ids"] = torch.arange(width).expand(out["input_ids"].shape[0], width).contiguous()
    return out


def _fit_columns(tensor: torch.Tensor, width: int) -> torch.Tensor:
    if tensor.shape[1] >= width:
        return tensor[:, :width]
    pad = tensor.new_zeros((tensor.shape[0], width - tensor.shape[1], *tensor.shape[2:]))
    return torch.cat([tensor, pad], dim=1)
