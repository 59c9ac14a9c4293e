"""An exponential moving average of a trained model's weights (OpenRLHF's ``--enable_ema``).

A second, frozen copy of the model on the same grid, in fp32 (``beta`` near 1 moves it by
``(1 - beta) x`` the weights each step: bf16 would round most of that away), updated after every
optimizer step as ``ema = beta * ema + (1 - beta) * weights``. Each rank keeps the EMA of its own
shards, so it costs one fp32 copy of a rank's weights. The training checkpoints carry it; the HF
export of the run is the EMA, as in OpenRLHF.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from models.builder import NO_RECOMPUTE, build_model

EMA_CHECKPOINT_KEY = "ema"


class EmaModel:
    def __init__(self, engine, beta: float):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"--ema_beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.model = build_model(engine.adapter, engine.config.parallel,
                                 replace(engine.config.build, bf16=False, **NO_RECOMPUTE))
        self.model.eval()
        self.model.requires_grad_(False)
        self._pairs = list(zip(self.model.parameters(), engine.model.parameters()))
        for ema, weight in self._pairs:
            if ema.shape != weight.shape:
                raise RuntimeError(f"EMA parameter of shape {tuple(ema.shape)} for a weight of {tuple(weight.shape)}")
        self.copy_weights()

    @torch.no_grad()
    def copy_weights(self) -> None:
        """Start (or restart) the average at the current weights."""
        for ema, weight in self._pairs:
            ema.copy_(weight)

    @torch.no_grad()
    def update(self) -> None:
        for ema, weight in self._pairs:
            ema.mul_(self.beta).add_(weight.float(), alpha=1.0 - self.beta)
