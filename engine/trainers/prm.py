"""Process reward model on the causal LM head (OpenRLHF style): at every step placeholder the
model is trained to predict the step's reward token ("+" / "-"), a cross-entropy over the
reward-token ids only; accuracy is the share of placeholders where the right one wins.

Hard labels travel as per-token ``labels`` (the reward token id at the placeholder, which is
not shifted: the label belongs to the placeholder position itself) and ``loss_mask`` (1 at the
placeholders), so context-parallel splitting and the token-mean scaling work unchanged.
"""
from __future__ import annotations

import torch

from engine.runtime.schedule import LossFn, gather_vocab
from engine.trainers.base import OfflineTrainer, OfflineTrainerConfig
from engine.trainers.losses import prm_loss


def prm_collate(samples: list[dict], pad_id: int, *, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``position_ids`` with placeholder targets.

    ``loss_mask`` is 1 at each placeholder; hard labels sit in ``labels`` (long), soft (numeric)
    labels in ``soft_labels`` (float32), both at the placeholder positions.
    """
    from engine.data.collate import padded_length

    width = padded_length(max(len(s["input_ids"]) for s in samples), pad_to_multiple_of)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, pad_id)
    soft_labels = torch.zeros(len(samples), width, dtype=torch.float32)
    loss_mask = torch.zeros(len(samples), width, dtype=torch.float32)
    soft = any(isinstance(label, float) for s in samples for label in s["step_labels"])
    for row, sample in enumerate(samples):
        input_ids[row, : len(sample["input_ids"])] = torch.as_tensor(list(sample["input_ids"]))
        positions = torch.as_tensor(list(sample["step_positions"]), dtype=torch.long)
        loss_mask[row, positions] = 1.0
        if soft:
            soft_labels[row, positions] = torch.as_tensor([float(x) for x in sample["step_labels"]])
        else:
            labels[row, positions] = torch.as_tensor([int(x) for x in sample["step_labels"]])
    batch = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
             "position_ids": torch.arange(width).expand(len(samples), width).contiguous()}
    if soft:
        batch["soft_labels"] = soft_labels
    return batch


def prm_loss_fn(scale: float, vocab_size: int, reward_token_ids: list[int] | None) -> LossFn:
    """Mean cross-entropy over all placeholders of the step (any layout), with accuracy."""

    def loss_fn(logits: torch.Tensor, batch: dict):
        at = batch["loss_mask"].bool()
        full = gather_vocab(logits, vocab_size)
        targets = batch["soft_labels"][at] if "soft_labels" in batch else batch["labels"][at]
        mean_loss, accuracy = prm_loss(full[at], targets, reward_token_ids=reward_token_ids)
        num_steps = at.sum().to(full.dtype)
        loss_sum = mean_loss * num_steps
        return loss_sum * scale, {"loss_sum": loss_sum.detach(), "acc_sum": accuracy * num_steps,
                                  "num_steps": num_steps.detach()}

    return loss_fn


class PRMTrainer(OfflineTrainer):
    """Trains on ``engine.data.process_reward.ProcessRewardDataset`` samples."""

    normaliser_key = "num_steps"

    def __init__(self, config: OfflineTrainerConfig, train_dataset, eval_dataset=None, *, pad_token_id: int,
                 reward_token_ids: list[int] | None = None):
        self.pad_token_id = pad_token_id
        self.reward_token_ids = reward_token_ids
        super().__init__(config, train_dataset, eval_dataset)
        if self.config.engine.parallel.context_parallel_size > 1 and self._has_soft_labels(train_dataset):
            raise ValueError("numeric step labels are not supported with --context_parallel_size > 1; "
                             "use reward-token labels")

    @staticmethod
    def _has_soft_labels(dataset) -> bool:
        return len(dataset) > 0 and isinstance(dataset[0]["step_labels"][0], float)

    def make_microbatches(self, samples: list) -> list[dict]:
        multiple = self.engine.sequence_multiple()
        return [prm_collate(group, self.pad_token_id, pad_to_multiple_of=multiple)
                for group in self.split_microbatches(samples)]

    def make_loss_fn(self, microbatches: list[dict]) -> LossFn:
        scale = self.engine.loss_scale(microbatches, key="loss_mask")
        return prm_loss_fn(scale, self.engine.vocab_size, self.reward_token_ids)
