"""KTO (Ethayarajh et al. 2024) on unpaired desirable / undesirable completions.

The reference point ``z`` is KTO's KL estimate: the mean ``policy - reference`` log-prob of
mismatched pairs (each prompt with the completion of the next sample of this rank's step,
wrapping around), averaged over data-parallel ranks and detached. Before every step the
policy (forward only, current weights) and the frozen reference score those mismatched rows,
and the reference scores the real ones; the loss then needs one policy forward and backward.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from engine.data.collate import pad_collate
from engine.data.packing import packed_sequences_collate
from engine.runtime.engine import frozen_copy
from engine.runtime.schedule import LossFn
from engine.trainers.base import OfflineTrainer, OfflineTrainerConfig
from engine.trainers.config import KTOConfig  # noqa: F401  (declared apart: the parsers import no torch)
from engine.trainers.losses import kto_loss
from engine.trainers.sequence_outputs import context_parallel_share, sequence_log_probs


def mismatched_samples(samples: list[dict], max_len: int) -> list[dict]:
    """Prompt ``i`` with the completion of sample ``i + 1`` (cyclically), cut to ``max_len``."""
    out = []
    for i, sample in enumerate(samples):
        other = samples[(i + 1) % len(samples)]
        prompt = list(sample["input_ids"][: sample["prompt_len"]])
        completion = list(other["input_ids"][other["prompt_len"]:])[: max(max_len - len(prompt), 1)]
        out.append({"input_ids": prompt + completion, "loss_mask": [0] * len(prompt) + [1] * len(completion)})
    return out


def kto_loss_fn(scale: float, config: KTOConfig, ref_log_probs: deque, kl: torch.Tensor, cp_group) -> LossFn:
    share = context_parallel_share(cp_group)

    def loss_fn(logits: torch.Tensor, batch: dict):
        reference = ref_log_probs.popleft()
        log_probs, _ = sequence_log_probs(logits, batch, cp_group=cp_group)
        desirable = batch["is_desirable"].to(log_probs.device).bool()
        loss_mean, _, _, z = kto_loss(
            log_probs, reference, desirable, kl=kl.to(log_probs.device), beta=config.beta,
            desirable_weight=config.desirable_loss_weight, undesirable_weight=config.undesirable_loss_weight,
        )
        loss_sum = loss_mean * log_probs.shape[0]
        with torch.no_grad():
            # beta * (policy - ref), signed so that it rises as desirable completions gain and
            # undesirable ones lose probability relative to the reference.
            sign = desirable.float() * 2 - 1
            metrics = {"loss_sum": loss_sum, "signed_reward_sum": (config.beta * (log_probs - reference) * sign).sum(),
                       "num_samples": log_probs.new_tensor(float(log_probs.shape[0]))}
        return loss_sum * share * scale, {**{k: v.detach() * share for k, v in metrics.items()}, "kl": z}

    return loss_fn


class KTOTrainer(OfflineTrainer):
    """Trains on ``engine.data.preference.UnpairedPreferenceDataset`` samples."""

    normaliser_key = "num_samples"

    def __init__(self, config: OfflineTrainerConfig, train_dataset, eval_dataset=None, *, kto: KTOConfig,
                 pad_token_id: int, max_len: int = 2048, packing_samples: bool = False):
        """``packing_samples``: a micro-batch's sequences (and its mismatched ones) packed into one row."""
        self.kto = kto
        self.packing_samples = packing_samples
        self.pad_token_id = pad_token_id
        self.max_len = max_len
        super().__init__(config, train_dataset, eval_dataset)
        self.reference = frozen_copy(self.engine, kto.ref_pretrain or config.engine.pretrain,
                                     role="--ref_pretrain", offload=kto.ref_offload)

    def _collate(self, samples: list[dict]) -> dict:
        collate = packed_sequences_collate if self.packing_samples else pad_collate
        batch = collate(samples, self.pad_token_id, pad_to_multiple_of=self.engine.sequence_multiple())
        batch["sample_mask"] = torch.ones(len(samples), dtype=torch.float32)
        return batch

    def make_microbatches(self, samples: list) -> list[dict]:
        """Real micro-batches, each carrying its mismatched (KL) rows under ``kl_batch``."""
        mismatched = self.split_microbatches(mismatched_samples(samples, self.max_len))
        microbatches = []
        for group, kl_group in zip(self.split_microbatches(samples), mismatched):
            batch = self._collate(group)
            batch["is_desirable"] = torch.tensor([bool(s["label"]) for s in group])
            batch["kl_batch"] = self._collate(kl_group)
            microbatches.append(batch)
        return microbatches

    def _kl_estimate(self, kl_batches: list[dict], cp_group) -> torch.Tensor:
        """Detached mean ``policy - reference`` over every rank's mismatched rows (last stage)."""

        def scores(out, b):
            return out.new_zeros(()), {"log_probs": sequence_log_probs(out, b, cp_group=cp_group)[0]}

        policy = [r["log_probs"] for r in self.engine.forward_only(kl_batches, scores)]
        reference = self.reference.forward_outputs(kl_batches, lambda out, b: scores(out, b)[1]["log_probs"])
        totals = torch.zeros(2, dtype=torch.float64)
        if ps.is_pipeline_last_stage():
            for p, r in zip(policy, reference):
                totals += torch.stack([(p - r).sum().double().cpu(), torch.tensor(float(p.numel()), dtype=torch.float64)])
            dist.all_reduce(totals, group=ps.get_data_parallel_group())
        return (totals[0] / totals[1].clamp(min=1)).float()

    def make_loss_fn(self, microbatches: list[dict]) -> LossFn:
        cp_group = ps.get_context_parallel_group()
        kl = self._kl_estimate([b["kl_batch"] for b in microbatches], cp_group)
        reference = self.reference.forward_outputs(microbatches, lambda out, b: sequence_log_probs(out, b, cp_group=cp_group)[0])
        scale = self.engine.loss_scale(microbatches, key="sample_mask")
        return kto_loss_fn(scale, self.kto, deque(reference), kl, cp_group)
