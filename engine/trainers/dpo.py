"""Direct preference optimisation (DPO, IPO, cDPO) against a frozen reference model.

Chosen and rejected sequences go through the policy in one forward (``preference_collate``'s
``2B`` rows); the reference (``--ref_pretrain``, default the policy's start) runs forward-only
over the same micro-batches before each step, keeping its sequence log-probs on the last
pipeline stage for the loss to consume in micro-batch order. Sequence log-probs are summed
over the response tokens on every CP rank (``sequence_outputs``), so the loss is exact under
TP / PP / CP / DP.
"""
from __future__ import annotations

from collections import deque

import torch
from megatron.core import parallel_state as ps

from engine.runtime.engine import frozen_copy
from engine.runtime.schedule import LossFn
from engine.trainers.config import DPOConfig  # noqa: F401  (declared apart: the parsers import no torch)
from engine.trainers.losses import dpo_loss
from engine.trainers.pairs import PairwiseTrainer
from engine.trainers.sequence_outputs import context_parallel_share, sequence_log_probs


def dpo_loss_fn(scale: float, config: DPOConfig, ref_log_probs: deque, cp_group) -> LossFn:
    """Pair-mean DPO loss (+ ``nll_loss_coef`` x chosen token-mean NLL), with OpenRLHF's metrics."""
    share = context_parallel_share(cp_group)

    def loss_fn(logits: torch.Tensor, batch: dict):
        reference = ref_log_probs.popleft()
        log_probs, num_tokens = sequence_log_probs(logits, batch, cp_group=cp_group)
        n = log_probs.shape[0] // 2
        loss_mean, chosen_reward, reject_reward = dpo_loss(
            log_probs[:n], log_probs[n:], reference[:n], reference[n:],
            beta=config.beta, label_smoothing=config.label_smoothing, ipo=config.ipo,
        )
        loss_sum = loss_mean * n
        nll_sum = -(log_probs[:n] / num_tokens[:n].clamp(min=1)).sum()
        total = loss_sum + config.nll_loss_coef * nll_sum if config.nll_loss_coef else loss_sum
        with torch.no_grad():
            metrics = {"loss_sum": loss_sum, "acc_sum": (chosen_reward > reject_reward).float().sum(),
                       "chosen_reward_sum": chosen_reward.sum(), "reject_reward_sum": reject_reward.sum(),
                       "nll_sum": nll_sum, "num_pairs": log_probs.new_tensor(float(n))}
        return total * share * scale, {k: v.detach() * share for k, v in metrics.items()}

    return loss_fn


class DPOTrainer(PairwiseTrainer):
    """A causal LM policy on paired preference batches, and its frozen reference."""

    def __init__(self, config, train_dataset, eval_dataset=None, *, dpo: DPOConfig, pad_token_id: int,
                 packing_samples: bool = False):
        self.dpo = dpo
        super().__init__(config, train_dataset, eval_dataset, pad_token_id=pad_token_id,
                         packing_samples=packing_samples)
        self.reference = frozen_copy(self.engine, dpo.ref_pretrain or config.engine.pretrain,
                                     role="--ref_pretrain", offload=dpo.ref_offload)

    def make_loss_fn(self, microbatches: list[dict]) -> LossFn:
        cp_group = ps.get_context_parallel_group()
        reference = self.reference.forward_outputs(microbatches, lambda out, b: sequence_log_probs(out, b, cp_group=cp_group)[0])
        return dpo_loss_fn(self.pair_loss_scale(microbatches), self.dpo, deque(reference), cp_group)
