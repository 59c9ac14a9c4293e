"""The training engine every trainer shares: a Megatron model on the parallel grid with its
optimizer, LR schedule, checkpoints and HF export.

    engine = TrainingEngine(EngineConfig(pretrain=..., parallel=..., optim=...), total_steps=100)
    result = engine.train_step(microbatches, loss_fn)
    engine.save_checkpoint(ckpt, step, trainer_state); engine.save_hf(path)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from engine.runtime.checkpoint import (
    CheckpointConfig,
    latest_valid_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from engine.runtime.optimizer import OptimConfig, build_optimizer, build_scheduler, wrap_ddp
from engine.runtime.schedule import LossFn, run_microbatches, token_mean_scale
from engine.runtime.train_step import StepResult, reduce_metrics, train_step
from models.builder import ModelBuildConfig, build_model
from models.registry import load_adapter
from models.weights import load_hf_weights, save_hf_checkpoint
from parallel.config import ParallelConfig
from parallel.initialize import initialize_parallel


@dataclass(kw_only=True)
class EngineConfig:
    pretrain: str  # HF directory (--pretrain)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    build: ModelBuildConfig = field(default_factory=ModelBuildConfig)
    seed: int = 42


class TrainingEngine:
    """One role's model, trainable, on this process's slot of the TP/PP/CP/EP/DP grid."""

    def __init__(self, config: EngineConfig, *, total_steps: int, load_weights: bool = True):
        self.config = config
        self.ctx = initialize_parallel(config.parallel, seed=config.seed)
        self.adapter = load_adapter(config.pretrain)
        self.model = build_model(self.adapter, config.parallel, config.build)
        if load_weights:
            load_hf_weights(self.model, self.adapter, config.pretrain, progress=self.is_rank_zero)
        self.ddp_model = wrap_ddp(self.model, config.optim)
        self.optimizer = build_optimizer(self.ddp_model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, total_steps=total_steps)

    # ----- facts about this rank ----------------------------------------------------------
    @property
    def is_rank_zero(self) -> bool:
        return dist.get_rank() == 0

    @property
    def data_parallel_size(self) -> int:
        return self.ctx.data_parallel_size

    @property
    def data_parallel_rank(self) -> int:
        return self.ctx.dp_rank

    @property
    def vocab_size(self) -> int:
        return self.adapter.vocab_size

    def sequence_multiple(self) -> int:
        """Sequence lengths must be multiples of this (sequence parallel x zigzag CP chunks)."""
        parallel = self.config.parallel
        tp = parallel.tensor_model_parallel_size if parallel.sequence_parallel else 1
        return tp * 2 * parallel.context_parallel_size if parallel.context_parallel_size > 1 else tp

    # ----- steps --------------------------------------------------------------------------
    def global_token_count(self, microbatches: list[dict], key: str = "loss_mask") -> int:
        """Loss tokens of the whole step over all DP ranks (for exact token-mean losses)."""
        local = torch.tensor(sum(int(b[key].sum()) for b in microbatches), dtype=torch.int64)
        dist.all_reduce(local, group=ps.get_data_parallel_group())
        return int(local)

    def loss_scale(self, microbatches: list[dict], key: str = "loss_mask") -> float:
        return token_mean_scale(
            num_microbatches=len(microbatches),
            data_parallel_size=self.data_parallel_size,
            global_num_tokens=self.global_token_count(microbatches, key),
        )

    def train_step(self, microbatches: list[dict], loss_fn: LossFn, *, normaliser_key: str | None = None) -> StepResult:
        self.ddp_model.train()
        seq_length = max(b["input_ids"].shape[1] for b in microbatches)
        return train_step(
            self.ddp_model, self.optimizer, self.scheduler, microbatches, loss_fn,
            seq_length=seq_length, normaliser_key=normaliser_key,
        )

    @torch.no_grad()
    def forward_only(self, microbatches: list[dict], loss_fn: LossFn) -> list[dict]:
        """Per-micro-batch outputs of ``loss_fn`` on the last stage (empty list elsewhere)."""
        self.ddp_model.eval()
        return run_microbatches(
            self.ddp_model, microbatches, loss_fn, num_microbatches=len(microbatches), forward_only=True,
            seq_length=max(b["input_ids"].shape[1] for b in microbatches),
            micro_batch_size=microbatches[0]["input_ids"].shape[0],
        )

    def evaluate(self, microbatches: list[dict], loss_fn: LossFn, *, normaliser_key: str | None = None) -> dict:
        return reduce_metrics(self.forward_only(microbatches, loss_fn), normaliser_key=normaliser_key)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ----- persistence --------------------------------------------------------------------
    def save_checkpoint(self, config: CheckpointConfig, step: int, trainer_state: dict) -> Path:
        return save_training_checkpoint(
            config, step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            trainer_state=trainer_state, adapter=self.adapter, hf_source_dir=self.config.pretrain,
        )

    def resume(self, config: CheckpointConfig) -> dict | None:
        """Restore the newest valid checkpoint under ``--ckpt_path``; None if there is none."""
        directory = latest_valid_checkpoint(config.ckpt_path) if config.load_checkpoint else None
        if directory is None:
            return None
        state = load_training_checkpoint(directory, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        if self.is_rank_zero:
            print(f"resumed from {directory}", flush=True)
        return state

    def save_hf(self, path: str | Path, *, config_updates: dict | None = None) -> None:
        save_hf_checkpoint(self.model, self.adapter, path, source_dir=self.config.pretrain, progress=self.is_rank_zero,
                           config_updates=config_updates)
