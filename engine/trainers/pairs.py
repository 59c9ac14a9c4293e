"""What the paired-preference trainers (reward model, DPO) share: chosen/rejected batching."""
from __future__ import annotations

from engine.data.collate import preference_collate
from engine.data.packing import preference_packed_collate
from engine.trainers.base import OfflineTrainer, OfflineTrainerConfig


class PairwiseTrainer(OfflineTrainer):
    """Trains on ``engine.data.preference.PreferenceDataset`` samples: micro-batches of
    ``--micro_train_batch_size`` pairs, i.e. ``2 x`` that many sequences (chosen, then rejected),
    as padded rows or, with ``packing_samples``, packed into one row (the same pairs per
    micro-batch, so the losses are the padded ones)."""

    normaliser_key = "num_pairs"

    def __init__(self, config: OfflineTrainerConfig, train_dataset, eval_dataset=None, *, pad_token_id: int,
                 packing_samples: bool = False):
        self.pad_token_id = pad_token_id
        self.packing_samples = packing_samples
        super().__init__(config, train_dataset, eval_dataset)

    def make_microbatches(self, samples: list) -> list[dict]:
        multiple = self.engine.sequence_multiple()
        collate = preference_packed_collate if self.packing_samples else preference_collate
        return [collate(group, self.pad_token_id, pad_to_multiple_of=multiple)
                for group in self.split_microbatches(samples)]

    def pair_loss_scale(self, microbatches: list[dict]) -> float:
        """Scale turning a micro-batch's summed pair losses into its share of the step's pair mean."""
        return self.engine.loss_scale(microbatches, key="pair_mask")
