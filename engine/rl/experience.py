"""A rollout's rows as every role reads them, with each per-row field named.

Per-token fields are ``[B, L]``, aligned with ``labels`` as ``engine.rl.sequences`` lays rows
out (the value at position ``t`` is about the token ``labels[t]``); ``last_index`` is ``[B]``.
The scores (log-probs, values, advantages, returns) are filled in as the rollout moves through
the loop; a field not computed in this run (no reference, no critic) stays None.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from engine.rl.sequences import RolloutBatch, trim_to_content


@dataclass
class Experience:
    input_ids: torch.Tensor  # [B, L] long, prompt + response, right-padded
    labels: torch.Tensor  # [B, L] long, input_ids shifted left
    position_ids: torch.Tensor  # [B, L] long
    action_mask: torch.Tensor  # [B, L] float, 1 where labels[t] is a response token that trains
    last_index: torch.Tensor  # [B] long, each row's last real token (reward models score there)
    old_log_probs: torch.Tensor | None = None  # [B, L] the actor's log-probs before this rollout's training
    ref_log_probs: torch.Tensor | None = None  # [B, L] the reference's
    values: torch.Tensor | None = None  # [B, L] the critic's
    advantages: torch.Tensor | None = None  # [B, L]
    returns: torch.Tensor | None = None  # [B, L]
    # [B, L] the engines' log-probs of their samples, when the training forward compares them with
    # its own (no old-log-prob forward: engine.rl.train_losses)
    rollout_log_probs: torch.Tensor | None = None
    # [B, L, layers, top_k] the engines' routing of each token (MoE; models.router_replay's encoding):
    # replayed by the actor under --router_replay, compared with its own for rollout/routing_mismatch
    routed_experts: torch.Tensor | None = None
    # [B, L] --turn_rewards per_turn: the environment's reward of each model turn but the last, on
    # the turn's last token (engine.rl.advantages.compute_token_rewards); read by the advantages only
    turn_rewards: torch.Tensor | None = None

    @classmethod
    def from_rollout(cls, batch: RolloutBatch) -> Experience:
        return cls(input_ids=batch.input_ids, labels=batch.labels, position_ids=batch.position_ids,
                   action_mask=batch.action_mask, last_index=batch.last_token_index(),
                   routed_experts=batch.routed_experts)

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def select(self, rows: torch.Tensor | slice) -> Experience:
        """The rows ``rows`` (indices or a slice) of every field."""
        return dataclasses.replace(self, **{name: t[rows] for name, t in self._tensors().items()})

    def with_fields(self, **fields: torch.Tensor | None) -> Experience:
        return dataclasses.replace(self, **fields)

    def token_batch(self) -> dict[str, torch.Tensor]:
        """The per-token fields present, as the micro-batch dict the schedule and the losses read,
        with ``attention_mask`` (1 up to each row's last real token: MoE routing statistics skip padding)."""
        positions = torch.arange(self.input_ids.shape[1])
        attention_mask = (positions[None, :] <= self.last_index[:, None]).long()
        return {**{name: t for name, t in self._tensors().items() if name not in ("last_index", "turn_rewards")},
                "attention_mask": attention_mask}

    @property
    def lengths(self) -> list[int]:
        """Each row's real tokens (prompt + response)."""
        return (self.last_index + 1).tolist()

    def microbatches_of(self, row_groups: list[list[int]], *, multiple: int = 1) -> list[dict]:
        """One micro-batch per list of row indices (``engine.data.token_budget``), cut as ``microbatches``."""
        return [trim_to_content(self.select(torch.tensor(rows, dtype=torch.long)).token_batch(), multiple=multiple,
                                mask_key="attention_mask", label_aligned=False)
                for rows in row_groups]

    def microbatches(self, start: int, stop: int, size: int, *, multiple: int = 1) -> list[dict]:
        """Rows ``[start, stop)`` in micro-batches of ``size`` rows, trailing padding columns cut
        to a multiple of ``multiple`` (sequence parallel x context parallel)."""
        # Cut after each row's last real token, not its last trained one: a reward model scores
        # there, and a loss mask may leave the end of a response untrained.
        return [trim_to_content(self.select(slice(lo, min(lo + size, stop))).token_batch(), multiple=multiple,
                                mask_key="attention_mask", label_aligned=False)
                for lo in range(start, stop, size)]
