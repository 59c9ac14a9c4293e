"""Knowledge distillation: the student learns ``(1 - kd_coef) * NLL + kd_coef * CE(teacher, student)``.

The teacher is a second, frozen Megatron model on the student's grid (same TP/PP/CP layout, no
optimizer, no DDP). Before every student step (and evaluation) the teacher runs forward-only over
the same micro-batches; only the last pipeline stage keeps its full-vocabulary logits, which the
student's loss consumes in micro-batch order (the schedule calls the loss in that order, 1F1B too).
"""
from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F

from engine.runtime.engine import frozen_copy
from engine.runtime.schedule import LossFn, gather_vocab
from engine.trainers.base import OfflineTrainerConfig
from engine.trainers.config import KDConfig  # noqa: F401  (declared apart: the parsers import no torch)
from engine.trainers.losses import kd_loss, log_probs_from_logits
from engine.trainers.sft import SFTTrainer


def kd_loss_fn(scale: float, kd_coef: float, vocab_size: int, teacher_logits: deque) -> LossFn:
    """Token-mean ``(1 - kd_coef) NLL + kd_coef CE(teacher || student)`` at the global scale.

    Reports ``loss``, ``nll``, ``kd`` (the distillation cross-entropy) and ``kl`` (forward
    KL(teacher || student) = cross-entropy - teacher entropy), all token means.
    """

    def loss_fn(logits: torch.Tensor, batch: dict):
        teacher = teacher_logits.popleft()
        mask = batch["loss_mask"].float()
        # Both terms from the gathered logits: Megatron's vocab-parallel cross entropy works in
        # place on its input, which would corrupt the student logits the KD term reads.
        student = gather_vocab(logits, vocab_size)
        nll_sum = -(log_probs_from_logits(student, batch["labels"]) * mask).sum()
        kd_sum = kd_loss(student, teacher, mask, normaliser=1.0)
        with torch.no_grad():
            teacher_entropy = -(F.softmax(teacher, -1) * F.log_softmax(teacher, -1)).sum(-1)
            kl_sum = kd_sum.detach() - (teacher_entropy * mask).sum()
        loss_sum = (1.0 - kd_coef) * nll_sum + kd_coef * kd_sum
        return loss_sum * scale, {"loss_sum": loss_sum.detach(), "nll_sum": nll_sum.detach(),
                                  "kd_sum": kd_sum.detach(), "kl_sum": kl_sum, "num_tokens": mask.sum().detach()}

    return loss_fn


class KDTrainer(SFTTrainer):
    """SFT data and batching (padded or packed); the loss adds the teacher's distribution."""

    def __init__(self, config: OfflineTrainerConfig, train_dataset, eval_dataset=None, *, kd: KDConfig,
                 pad_token_id: int, packing_samples: bool = False, max_len: int = 2048, max_tokens: int | None = None):
        self.kd = kd
        super().__init__(config, train_dataset, eval_dataset, pad_token_id=pad_token_id,
                         packing_samples=packing_samples, max_len=max_len, max_tokens=max_tokens)
        self.teacher = frozen_copy(self.engine, kd.teacher_model, role="--teacher_model", offload=kd.teacher_offload)

    def make_loss_fn(self, microbatches: list[dict]) -> LossFn:
        vocab_size = self.engine.vocab_size
        # Full-vocabulary teacher logits (this CP rank's share) for every micro-batch, kept on the last stage.
        teacher_logits = deque(self.teacher.forward_outputs(
            microbatches, lambda out, batch: gather_vocab(out, vocab_size).float()))
        return kd_loss_fn(self.engine.loss_scale(microbatches), self.kd.kd_coef, self.engine.vocab_size,
                          teacher_logits)
