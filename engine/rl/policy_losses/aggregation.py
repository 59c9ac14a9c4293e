"""How the policy losses reduce per-token losses to the step's loss (``--loss_agg_mode``, veRL's).

With ``m`` the trained tokens (the response tokens a loss mask keeps), ``l_it`` the loss of token
``t`` of sequence ``i`` and ``S`` the sequences with at least one trained token:

    token-mean               sum_it m l / sum_it m                (the global token mean, default)
    seq-mean-token-sum       sum_i (sum_t m l) / |S|
    seq-mean-token-mean      sum_i (sum_t m l / sum_t m) / |S|
    seq-mean-token-sum-norm  sum_i (sum_t m l / --generate_max_len) / |S|   (Dr. GRPO's constant)

Every mode is linear in the token losses: ``sum_it w_it l_it / D`` with per-token weights ``w``
(``m``, or ``m / n_i`` for seq-mean-token-mean) and one divisor ``D`` of the optimizer step.
Both are counted on the whole micro-batch rows before they are packed or cut for context
parallelism (``annotate_microbatches``), and ``D`` over every micro-batch of every DP rank
(``step_counts``): so each aggregation is exact under every DP / CP / packing layout, with no
collective in the loss itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.rl.config import LOSS_AGG_MODES, LossAggMode, check_loss_agg_mode  # noqa: F401  (declared apart: the parsers import no torch)


def annotate_microbatches(microbatches: list[dict], *, mode: str, mask_key: str = "action_mask") -> list[dict]:
    """Each padded micro-batch with ``sequence_index`` (long ``[rows, L]``: the row a token is of;
    packing keeps it per token, CP splits it) and ``num_sequences``; seq-mean-token-mean adds
    ``aggregation_weights`` (``1 / n_i`` on the tokens of row ``i``, ``n_i`` its trained tokens)."""
    out = []
    for batch in microbatches:
        mask = batch[mask_key]
        rows, width = mask.shape
        extra = {"sequence_index": torch.arange(rows)[:, None].expand(rows, width).contiguous(),
                 "num_sequences": torch.tensor(rows)}
        if mode == "seq-mean-token-mean":
            extra["aggregation_weights"] = (1.0 / mask.sum(1).clamp(min=1))[:, None].expand(rows, width).contiguous()
        out.append({**batch, **extra})
    return out


@dataclass(frozen=True)
class StepCounts:
    """The optimizer step's trained tokens and sequences, over all its micro-batches and DP ranks."""

    num_tokens: int
    num_sequences: int  # with at least one trained token


def step_counts(microbatches: list[dict], *, dp_group, mask_key: str = "action_mask") -> StepCounts:
    """Counted on the padded rows (before packing); one all-reduce over ``dp_group``."""
    local = torch.tensor([[int(b[mask_key].sum()), int((b[mask_key].sum(1) > 0).sum())] for b in microbatches],
                         dtype=torch.int64).sum(0) if microbatches else torch.zeros(2, dtype=torch.int64)
    dist.all_reduce(local, group=dp_group)
    return StepCounts(num_tokens=int(local[0]), num_sequences=int(local[1]))


@dataclass(frozen=True)
class Aggregation:
    """One optimizer step's aggregation, shared by the policy loss, the KL loss and their metrics.

    A loss returns ``aggregation.sum(per_token_loss, batch)``, its weighted token sum on this
    rank's tokens; the caller multiplies the step's total by ``scale`` (Megatron then scales by
    ``cp_size / num_microbatches`` and averages gradients over DP x CP: the gradient is that of
    the aggregated loss of the whole step, whatever the layout).
    """

    mode: str
    scale: float
    context_parallel_size: int = 1

    @classmethod
    def for_step(cls, mode: str, counts: StepCounts, *, num_microbatches: int, data_parallel_size: int,
                 context_parallel_size: int = 1, max_response_len: int = 1) -> Aggregation:
        check_loss_agg_mode(mode)
        if mode == "seq-mean-token-sum-norm" and max_response_len < 1:
            raise ValueError(f"--loss_agg_mode {mode} divides by --generate_max_len, got {max_response_len}")
        divisor = {"token-mean": counts.num_tokens,
                   "seq-mean-token-sum-norm": counts.num_sequences * max_response_len}.get(mode, counts.num_sequences)
        # engine.runtime.schedule.token_mean_scale's factor, with this mode's divisor
        scale = num_microbatches * data_parallel_size / max(divisor, 1)
        return cls(mode=mode, scale=scale, context_parallel_size=context_parallel_size)

    def token_weights(self, mask: torch.Tensor, batch: dict) -> torch.Tensor:
        """``w``: the trained-token mask, times ``1 / n_i`` for seq-mean-token-mean."""
        if self.mode == "seq-mean-token-mean":
            return mask * batch["aggregation_weights"].to(mask.dtype)
        return mask

    def sum(self, per_token: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_t w_t l_t`` on this rank's tokens (the policy losses' reduction)."""
        return (per_token * weights.to(per_token.dtype)).sum()

    def metric(self, name: str, weighted_sum: torch.Tensor) -> dict[str, torch.Tensor]:
        """A loss term for ``engine.runtime.train_step.reduce_metrics``: under token-mean the token
        sum that it divides by the step's ``num_tokens`` (as before this seam); otherwise the sum
        times ``scale x cp_size``, whose mean over the step's micro-batches and DP x CP ranks is the
        aggregated loss."""
        if self.mode == "token-mean":
            return {f"{name}_sum": weighted_sum.detach()}
        return {name: weighted_sum.detach() * (self.scale * self.context_parallel_size)}
