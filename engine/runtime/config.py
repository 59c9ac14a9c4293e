"""The shared training engine's options: the model and its grid, the optimizer, checkpoints and
logging. Declared apart from the code that runs them so that a job's parser imports neither torch
nor megatron-core (``--help`` in well under two seconds)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from models.build_config import ModelBuildConfig
from parallel.config import ParallelConfig
from parallel.options import option

LR_SCHEDULES = {"cosine_with_min_lr": "cosine", "cosine": "cosine", "constant": "constant", "linear": "linear"}


@dataclass(kw_only=True)
class OptimConfig:
    """Megatron's distributed Adam and its LR schedule."""

    learning_rate: float = option(1e-5, help="peak learning rate")
    lr_warmup_ratio: float = option(0.03, help="fraction of the steps spent in linear warmup")
    lr_scheduler: Literal["cosine_with_min_lr", "cosine", "constant", "linear"] = option(
        "cosine_with_min_lr", help="learning-rate schedule after warmup")
    min_lr_ratio: float = option(0.1, help="cosine / linear decay ends at learning_rate x this")
    weight_decay: float = option(0.0, flag="l2", help="weight decay")
    adam_betas: tuple[float, float] = option((0.9, 0.95), help="Adam beta1 beta2")
    max_norm: float = option(1.0, help="gradient clipping (0 disables)")
    adam_offload: bool = option(False, help="Adam states (and, with Transformer Engine, the fp32 master weights) in "
                                            "host memory, the update on the CPU (megatron-core's HybridDeviceOptimizer)"
                                            "; a CPU build holds them in host memory anyway")
    max_skipped_steps: int = option(3, help="stop the run (an error naming the cause) after this many optimizer "
                                            "steps in a row skipped for a non-finite loss or grad norm (0: never "
                                            "stop); a skipped step leaves the weights unchanged on every rank")
    adam_eps: float = 1e-8
    use_distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.lr_warmup_ratio < 1:
            raise ValueError(f"--lr_warmup_ratio must be in [0, 1), got {self.lr_warmup_ratio}")
        if self.lr_scheduler not in LR_SCHEDULES:
            raise ValueError(f"--lr_scheduler must be one of {sorted(LR_SCHEDULES)}, got {self.lr_scheduler!r}")
        if self.max_norm < 0:
            raise ValueError(f"--max_norm must be >= 0 (0 disables clipping), got {self.max_norm}")
        if self.max_skipped_steps < 0:
            raise ValueError(f"--max_skipped_steps must be >= 0 (0: never stop), got {self.max_skipped_steps}")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Resumable training checkpoints."""

    ckpt_path: str | None = option(None, help="directory of resumable training checkpoints")
    save_steps: int = option(-1, help="checkpoint every N steps and at the last one (-1: no checkpoints)")
    max_ckpt_num: int = option(3, help="checkpoints kept (oldest removed)")
    load_checkpoint: bool = option(False, help="resume from the newest valid checkpoint under --ckpt_path")
    require_checkpoint: bool = option(False, help="with --load_checkpoint: fail when --ckpt_path holds no usable "
                                                  "checkpoint (default: say so and start fresh)")
    async_save: bool = option(False, help="write checkpoints in the background: training goes on after a snapshot "
                                          "of the state (a host copy: memory for one more copy of each rank's "
                                          "state); the checkpoint appears once complete (a crash before leaves the "
                                          "previous one the newest)")

    def __post_init__(self) -> None:
        if self.max_ckpt_num < 1:
            raise ValueError(f"--max_ckpt_num must be >= 1, got {self.max_ckpt_num}")
        if (self.load_checkpoint or self.save_steps > 0) and not self.ckpt_path:
            raise ValueError("--load_checkpoint / --save_steps need --ckpt_path")
        if self.require_checkpoint and not self.load_checkpoint:
            raise ValueError("--require_checkpoint needs --load_checkpoint")

    @property
    def used_path(self) -> str | None:
        """--ckpt_path when this job reads or writes it (the job then locks it), else None."""
        return self.ckpt_path if self.load_checkpoint or self.save_steps > 0 else None


@dataclass(kw_only=True)
class PreemptionConfig:
    """What SIGTERM / SIGINT (Slurm's preemption and time-limit signal, Ctrl-C) do to a run."""

    save_on_preempt: bool | None = option(
        None, value_aliases={"no_save_on_preempt": False},
        help="on SIGTERM / SIGINT finish or abandon the current phase, write a checkpoint to --ckpt_path and "
             "stop (default: on when the job uses --ckpt_path: --save_steps or --load_checkpoint)")
    preempt_grace_s: float = option(240.0, help="after SIGTERM / SIGINT the run exits (code 128 + signal) within "
                                                "this many seconds, checkpoint written or not; a second signal "
                                                "exits at once")

    def __post_init__(self) -> None:
        if self.preempt_grace_s <= 0:
            raise ValueError(f"--preempt_grace_s must be > 0, got {self.preempt_grace_s}")

    def saves(self, checkpoint: CheckpointConfig) -> bool:
        """Whether a signal writes a checkpoint: --save_on_preempt, by default when --ckpt_path is used."""
        if self.save_on_preempt is None:
            return checkpoint.used_path is not None
        return self.save_on_preempt and bool(checkpoint.ckpt_path)

    def used_path(self, checkpoint: CheckpointConfig) -> str | None:
        """--ckpt_path when this job reads or writes it, preemption checkpoints included."""
        return checkpoint.used_path or (checkpoint.ckpt_path if self.saves(checkpoint) else None)


@dataclass(kw_only=True)
class LoggingConfig:
    """Where metrics go."""

    logging_steps: int = option(1, help="log metrics every N steps")
    use_tensorboard: str | None = option(None, metavar="DIR", help="TensorBoard log directory")
    use_wandb: str | None = option(None, metavar="KEY|True|offline",
                                   help="wandb API key; True: the existing login (offline without one); offline")
    wandb_org: str | None = option(None, help="wandb entity (team or user)")
    wandb_group: str | None = option(None, help="wandb run group")
    wandb_project: str = option("megatron-rlhf", help="wandb project")
    wandb_run_name: str | None = option(None, help="wandb run name")

    def __post_init__(self) -> None:
        if self.logging_steps < 1:
            raise ValueError(f"--logging_steps must be >= 1, got {self.logging_steps}")


@dataclass(kw_only=True)
class EngineConfig:
    """The model, its grid and its optimizer."""

    pretrain: str = option(help="model to start from: an HF directory or a Megatron checkpoint (tools.convert."
                                "hf_to_mcore output or <ckpt_path>/global_stepN), written under any layout")
    seed: int = option(42, help="random seed (initialisation, data order, sampling)")
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    build: ModelBuildConfig = field(default_factory=ModelBuildConfig)
    pretrain_flag: str = "--pretrain"  # the flag ``pretrain`` came from (--reward_pretrain ...), named in errors
