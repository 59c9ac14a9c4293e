"""What the paired-preference trainers (reward model, DPO) share: chosen/rejected batching."""
from __future__ import annotations

from engine.data.collate import preference_collate
from engine.trainers.base import OfflineTrainer, OfflineTrainerConfig


class PairwiseTrainer(OfflineTrainer):
    """Trains on ``engine.data.preference.PreferenceDataset`` samples: micro-batches of
    ``--micro_train_batch_size`` pairs, i.e. ``2 x`` that many rows (chosen, then rejected)."""

    normaliser_key = "num_pairs"

    def __init__(self, config: OfflineTrainerConfig, train_dataset, eval_dataset=None, *, pad_token_id: int):
        self.pad_token_id = pad_token_id
        super().__init__(config, train_dataset, eval_dataset)

    def make_microbatches(self, samples: list) -> list[dict]:
        multiple = self.engine.sequence_multiple()
        return [preference_collate(group, self.pad_token_id, pad_to_multiple_of=multiple)
                for group in self.split_microbatches(samples)]

    def pair_loss_scale(self, microbatches: list[dict]) -> float:
        """Scale turning a micro-batch's summed pair losses into its share of the step's pair mean."""
        return self.engine.loss_scale(microbatches, key="pair_mask")
