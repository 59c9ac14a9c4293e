"""Rollout backends by name (``--rollout_backend``): what starts a pool of generation engines.

A backend is one module that defines its engines and a ``RolloutBackend``, plus one line in
``ROLLOUT_BACKENDS`` naming where that object lives (imported only when the backend is chosen,
so building a parser never imports an inference library). The RL loop and the weight sync then
talk to the started pool through ``engine.ray.engine_pool.EnginePool`` only.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from parallel.options import option

# name -> "module:attribute" of its RolloutBackend
ROLLOUT_BACKENDS: dict[str, str] = {
    "vllm": "engine.ray.vllm_engine:BACKEND",
}


@dataclass(frozen=True)
class RolloutBackend:
    """How to start one kind of engine pool from the engine config (``--vllm_*`` flags today:
    pretrain, number of engines, TP size, dtype, seed, placement)."""

    name: str
    start: Callable[[Any], Any]  # engine config -> a started EnginePool (raises naming the engine)
    on_gpus: Callable[[Any], bool]  # whether start(config) puts the engines on GPUs (picks the sync transport)
    # Whether the engines read --pretrain's weights themselves; False: they wait for the actor's first sync.
    loads_own_weights: Callable[[Any], bool]


@dataclass(kw_only=True)
class RolloutBackendConfig:
    """Which engines generate the rollouts."""

    rollout_backend: str = option("vllm", help="generation engines: " + ", ".join(ROLLOUT_BACKENDS))

    def __post_init__(self) -> None:
        if self.rollout_backend not in ROLLOUT_BACKENDS:
            raise ValueError(f"--rollout_backend {self.rollout_backend!r} is not known; known: "
                             + ", ".join(sorted(ROLLOUT_BACKENDS)))


def register_rollout_backend(name: str, location: str) -> None:
    """Add a backend: ``location`` is ``"module:attribute"`` of its ``RolloutBackend``."""
    ROLLOUT_BACKENDS[name] = location


def rollout_backend(name: str) -> RolloutBackend:
    if name not in ROLLOUT_BACKENDS:
        raise ValueError(f"--rollout_backend {name!r} is not known; known: " + ", ".join(sorted(ROLLOUT_BACKENDS)))
    module, attribute = ROLLOUT_BACKENDS[name].split(":")
    backend = getattr(importlib.import_module(module), attribute)
    if not isinstance(backend, RolloutBackend):
        raise TypeError(f"{ROLLOUT_BACKENDS[name]} is not a RolloutBackend")
    return backend
