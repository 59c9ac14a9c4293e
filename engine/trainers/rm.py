"""Pairwise (Bradley-Terry) reward model: a value head read at each sequence's eos.

Batches are ``preference_collate``'s ``2B`` rows (chosen, then rejected). The loss is the mean
over pairs of ``-logsigmoid(r_chosen - r_rejected - margin)`` in fp32 (``margin``: the row's
``margin`` column with ``--margin_loss``, else 0, as in OpenRLHF), exact under every TP / PP / CP /
DP layout. The HF export (``AutoModelForSequenceClassification``, ``score`` head) carries the
reward statistics ``mean`` / ``std`` in its config, measured at the end of training on the
eval split (else on the first training pairs), so consumers can normalise rewards.
"""
from __future__ import annotations

import math

import torch
from megatron.core import parallel_state as ps

from engine.runtime.schedule import LossFn
from engine.trainers.base import OfflineTrainerConfig
from engine.trainers.config import RMConfig  # noqa: F401  (declared apart: the parsers import no torch)
from engine.trainers.losses import pairwise_rm_loss
from engine.trainers.pairs import PairwiseTrainer
from engine.trainers.sequence_outputs import context_parallel_share, last_token_values

STATS_MAX_PAIRS = 1024  # pairs scored for the exported reward statistics without an eval split


def rm_loss_fn(scale: float, cp_group, *, margin_loss: bool = False) -> LossFn:
    share = context_parallel_share(cp_group)

    def loss_fn(values: torch.Tensor, batch: dict):
        rewards = last_token_values(values, batch, cp_group=cp_group)  # fp32
        num_pairs = rewards.shape[0] // 2
        chosen, rejected = rewards[:num_pairs], rewards[num_pairs:]
        margin = batch["margin"].to(rewards.device, torch.float32) if margin_loss else None
        loss_sum = pairwise_rm_loss(chosen, rejected, margin) * num_pairs
        with torch.no_grad():
            metrics = {"loss_sum": loss_sum, "acc_sum": (chosen > rejected).float().sum(),
                       "chosen_reward_sum": chosen.sum(), "reject_reward_sum": rejected.sum(),
                       "num_pairs": rewards.new_tensor(float(num_pairs))}
        return loss_sum * share * scale, {k: v.detach() * share for k, v in metrics.items()}

    return loss_fn


def reward_moments_fn(cp_group) -> LossFn:
    """Forward-only: the sums giving the mean and second moment of every row's reward."""
    share = context_parallel_share(cp_group)

    def moments(values: torch.Tensor, batch: dict):
        rewards = last_token_values(values, batch, cp_group=cp_group)
        metrics = {"reward_sum": rewards.sum(), "reward_sq_sum": rewards.square().sum(),
                   "num_rewards": rewards.new_tensor(float(rewards.numel()))}
        return rewards.new_zeros(()), {k: v.detach() * share for k, v in metrics.items()}

    return moments


class RewardModelTrainer(PairwiseTrainer):
    """The engine must be built with a value head (``offline_trainer_config(args, value_head=True)``)."""

    def __init__(self, config: OfflineTrainerConfig, train_dataset, eval_dataset=None, *, pad_token_id: int,
                 rm: RMConfig | None = None, packing_samples: bool = False):
        if not config.engine.build.value_head:
            raise ValueError("the reward model trainer needs an engine built with a value head")
        self.rm = rm or RMConfig()
        super().__init__(config, train_dataset, eval_dataset, pad_token_id=pad_token_id,
                         packing_samples=packing_samples)

    def make_loss_fn(self, microbatches: list[dict]) -> LossFn:
        return rm_loss_fn(self.pair_loss_scale(microbatches), ps.get_context_parallel_group(),
                          margin_loss=self.rm.margin_loss)

    def reward_statistics(self) -> dict[str, float]:
        """Mean and (unbiased, as OpenRLHF saves it) standard deviation of the rewards of chosen and
        rejected sequences."""
        dataset = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
        samples = self.strided_share(dataset, None if self.eval_dataset is not None else STATS_MAX_PAIRS)
        if not samples:
            return {}
        microbatches = self.make_microbatches(samples)
        moments = self.engine.evaluate(microbatches, reward_moments_fn(ps.get_context_parallel_group()),
                                       normaliser_key="num_rewards")
        mean, count = moments["reward"], moments["num_rewards"]
        variance = max(moments["reward_sq"] - mean * mean, 0.0) * count / max(count - 1, 1)
        return {"mean": mean, "std": math.sqrt(variance)}

    def export_config_updates(self) -> dict:
        return self.reward_statistics()
