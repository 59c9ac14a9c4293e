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


def prm_collate(samples: list[dict], pad_id: int, *, pad_to_multiple_of: int = 1,
                packed: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``position_ids`` with placeholder targets; ``packed``: the samples
    back to back in one row (``cu_seqlens``, positions restarting in each), as ``--packing_samples``.

    ``loss_mask`` is 1 at each placeholder; hard labels sit in ``labels`` (long), soft (numeric)
    labels in ``soft_labels`` (float32), both at the placeholder positions.
    """
    from engine.data.collate import padded_length

    lengths = [len(s["input_ids"]) for s in samples]
    starts = [sum(lengths[:i]) for i in range(len(samples))] if packed else [0] * len(samples)
    rows = 1 if packed else len(samples)
    width = padded_length(sum(lengths) if packed else max(lengths), pad_to_multiple_of)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, pad_id)
    soft_labels = torch.zeros(rows, width, dtype=torch.float32)
    loss_mask = torch.zeros(rows, width, dtype=torch.float32)
    position_ids = torch.arange(width).expand(rows, width).clone()
    soft = any(isinstance(label, float) for s in samples for label in s["step_labels"])
    for index, (sample, start) in enumerate(zip(samples, starts)):
        row = 0 if packed else index
        input_ids[row, start:start + lengths[index]] = torch.as_tensor(list(sample["input_ids"]))
        position_ids[row, start:start + lengths[index]] = torch.arange(lengths[index])
        positions = start + torch.as_tensor(list(sample["step_positions"]), dtype=torch.long)
        loss_mask[row, positions] = 1.0
        if soft:
            soft_labels[row, positions] = torch.as_tensor([float(x) for x in sample["step_labels"]])
        else:
            labels[row, positions] = torch.as_tensor([int(x) for x in sample["step_labels"]])
    batch = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
    if packed:
        batch["cu_seqlens"] = torch.tensor([0, *[s + n for s, n in zip(starts, lengths)]], dtype=torch.int32)
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
                 reward_token_ids: list[int] | None = None, packing_samples: bool = False):
        self.pad_token_id = pad_token_id
        self.packing_samples = packing_samples
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
        return [prm_collate(group, self.pad_token_id, pad_to_multiple_of=multiple, packed=self.packing_samples)
                for group in self.split_microbatches(samples)]

    def make_loss_fn(self, microbatches: list[dict]) -> LossFn:
        scale = self.engine.loss_scale(microbatches, key="loss_mask")
        return prm_loss_fn(scale, self.engine.vocab_size, self.reward_token_ids)
