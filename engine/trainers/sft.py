"""Supervised fine-tuning (and continued pre-training): token-mean NLL on response tokens."""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel

from engine.data.collate import pad_collate
from engine.data.packing import pack_samples, packed_collate
from engine.data.token_budget import balanced_microbatches, check_fits
from engine.runtime.schedule import LossFn
from engine.trainers.base import OfflineTrainer, OfflineTrainerConfig


def sft_loss_fn(scale: float) -> LossFn:
    """NLL summed over the loss mask, scaled to the step's global token mean."""

    def loss_fn(logits: torch.Tensor, batch: dict):
        token_losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch["labels"])
        mask = batch["loss_mask"].to(token_losses.dtype)
        loss_sum = (token_losses * mask).sum()
        return loss_sum * scale, {"loss_sum": loss_sum.detach(), "num_tokens": mask.sum().detach()}

    return loss_fn


class SFTTrainer(OfflineTrainer):
    normaliser_key = "num_tokens"

    def __init__(self, config: OfflineTrainerConfig, train_dataset, eval_dataset=None, *, pad_token_id: int,
                 packing_samples: bool = False, max_len: int = 2048, max_tokens: int | None = None):
        """``max_tokens`` (--use_dynamic_batch_size --max_tokens_per_gpu): training micro-batches of at most
        that many tokens, packed, balanced over DP ranks by tokens (``engine.data.token_budget``)."""
        self.pad_token_id = pad_token_id
        self.packing_samples = packing_samples
        self.max_len = max_len
        self.max_tokens = max_tokens
        super().__init__(config, train_dataset, eval_dataset)

    def step_microbatches(self) -> list[dict]:
        if self.max_tokens is None:
            return super().step_microbatches()
        indices = self.global_batch_indices()
        samples = [self.train_dataset[i] for i in indices]
        lengths = [len(s["input_ids"]) for s in samples]
        check_fits(lengths, self.max_tokens, what="training sample", indices=indices)
        plan = balanced_microbatches(lengths, max_tokens=self.max_tokens, num_ranks=self.engine.data_parallel_size)
        multiple = self.engine.sequence_multiple()
        return [packed_collate([samples[i] for i in group], pad_id=self.pad_token_id, pad_to_multiple_of=multiple)
                for group in plan[self.engine.data_parallel_rank]]

    def make_microbatches(self, samples: list) -> list[dict]:
        multiple = self.engine.sequence_multiple()
        if self.packing_samples:
            return [
                packed_collate(pack, pad_id=self.pad_token_id, pad_to_multiple_of=multiple)
                for pack in pack_samples(samples, self.max_len)
            ]
        return [
            pad_collate(group, pad_id=self.pad_token_id, pad_to_multiple_of=multiple)
            for group in self.split_microbatches(samples)
        ]

    def make_loss_fn(self, microbatches: list[dict]) -> LossFn:
        return sft_loss_fn(self.engine.loss_scale(microbatches))
