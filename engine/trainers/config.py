"""The offline trainers' options (the loop, and each loss's), declared apart from the trainers so
that a job's parser imports neither torch nor megatron-core."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.runtime.config import CheckpointConfig, EngineConfig, LoggingConfig
from parallel.options import option


@dataclass(kw_only=True)
class TrainLoopConfig:
    """Epochs, batch sizes, evaluation and the final export."""

    max_epochs: int = option(1, help="passes over the training set")
    train_batch_size: int = option(128, help="samples per optimizer step, over all data-parallel ranks")
    micro_train_batch_size: int = option(8, help="samples per micro-batch per rank (gradient accumulation fills the rest)")
    max_steps: int | None = option(None, help="stop after N optimizer steps (the LR schedule is unchanged)")
    eval_steps: int = option(-1, help="evaluate every N steps (-1: at the end, when --eval_split is given)")
    save_path: str | None = option(None, help="final HF checkpoint directory")
    save_hf_ckpt: bool = option(False, help="also export HF weights with each training checkpoint")

    def __post_init__(self) -> None:
        for flag in ("max_epochs", "train_batch_size", "micro_train_batch_size"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(self, flag)}")


@dataclass(kw_only=True)
class OfflineTrainerConfig:
    engine: EngineConfig
    loop: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass(kw_only=True)
class DPOConfig:
    """The DPO family's loss and its reference model."""

    beta: float = option(0.1, help="DPO temperature")
    ipo: bool = option(False, help="IPO loss instead of DPO's")
    label_smoothing: float = option(0.0, help="cDPO: the assumed rate of flipped preference labels")
    nll_loss_coef: float = option(0.0, help="weight of the chosen responses' per-token NLL (RPO)")
    ref_pretrain: str | None = option(None, help="reference model, HF directory or Megatron checkpoint (default: --pretrain)")
    ref_offload: bool = option(False, help="keep the reference in host memory between uses (GPU)")

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.ipo and self.label_smoothing > 0:
            raise ValueError("--label_smoothing (cDPO) does not apply with --ipo")
        if self.nll_loss_coef < 0:
            raise ValueError(f"--nll_loss_coef must be >= 0, got {self.nll_loss_coef}")


@dataclass(kw_only=True)
class KTOConfig:
    """KTO's loss and its reference model."""

    beta: float = option(0.01, help="KTO temperature")
    desirable_loss_weight: float = option(1.0, help="weight of desirable completions")
    undesirable_loss_weight: float = option(1.0, help="weight of undesirable completions")
    ref_pretrain: str | None = option(None, help="reference model, HF directory or Megatron checkpoint (default: --pretrain)")
    ref_offload: bool = option(False, help="keep the reference in host memory between uses (GPU)")

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        for flag in ("desirable_loss_weight", "undesirable_loss_weight"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0, got {getattr(self, flag)}")


@dataclass(kw_only=True)
class RMConfig:
    """The pairwise loss."""

    margin_loss: bool = option(False, help="subtract each pair's margin column inside the loss (without it "
                                           "margins are read but not used, as in OpenRLHF)")


@dataclass(kw_only=True)
class KDConfig:
    """Distillation from a frozen teacher with the student's tokenizer."""

    teacher_model: str = option(help="the frozen teacher: HF directory or Megatron checkpoint")
    kd_coef: float = option(0.4, help="weight of the distillation term (1 - it: NLL)")
    teacher_offload: bool = option(False, help="keep the teacher in host memory between uses (GPU)")

    def __post_init__(self) -> None:
        if not self.teacher_model:
            raise ValueError("--teacher_model is required for knowledge distillation")
        if not 0.0 <= self.kd_coef <= 1.0:
            raise ValueError(f"--kd_coef must be in [0, 1], got {self.kd_coef}")
