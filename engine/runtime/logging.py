"""Metrics to the console (tqdm), TensorBoard and wandb (offline when there is no network)."""
from __future__ import annotations

import os

import torch.distributed as dist

from engine.runtime.config import LoggingConfig  # noqa: F401  (declared apart: the parsers import no torch)


class MetricsLogger:
    """Rank 0 writes; other ranks get a logger that does nothing."""

    def __init__(self, config: LoggingConfig, *, run_config: dict | None = None):
        self.config = config
        self.enabled = not dist.is_initialized() or dist.get_rank() == 0
        self._tensorboard = None
        self._wandb = None
        if not self.enabled:
            return
        if config.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(config.use_tensorboard)
        if config.use_wandb:
            self._wandb = self._init_wandb(config, run_config or {})

    @staticmethod
    def _init_wandb(config: LoggingConfig, run_config: dict):
        import wandb

        if config.use_wandb.lower() in ("1", "true"):
            # OpenRLHF's "True": the login already there (WANDB_API_KEY or `wandb login`), else offline.
            if not os.environ.get("WANDB_API_KEY") and not wandb.login(prompt=False):
                os.environ["WANDB_MODE"] = "offline"
        elif config.use_wandb == "offline":
            os.environ["WANDB_MODE"] = "offline"
        else:
            os.environ.setdefault("WANDB_API_KEY", config.use_wandb)
        return wandb.init(entity=config.wandb_org, project=config.wandb_project, group=config.wandb_group,
                          name=config.wandb_run_name, config=run_config)

    def log(self, metrics: dict[str, float], step: int, *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        for name, value in metrics.items():
            if self._tensorboard is not None:
                self._tensorboard.add_scalar(f"{prefix}/{name}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
