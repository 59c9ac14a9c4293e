"""The parallel layout a training checkpoint was written at, and what of a rank's own state a resume
at another layout keeps.

Everything sharded reshards on load (megatron-core ``dist_checkpointing``): the model, the
optimizer state (Megatron's ``fully_reshardable`` format), an EMA and LoRA adapters. The LR
schedule and the data position (counted in samples, ``engine.data.position``) are global. What does
not reshard is a rank's own RNG state: at another TP / PP / CP / EP / DP grid or world size, rank r
is no longer the rank r that saved it (nor is there one state per rank of a larger world). So:

- same layout: each rank gets its own RNG state back (Python, NumPy, torch, CUDA and Megatron's
  tensor-parallel tracker): the run continues exactly;
- another layout: every rank is re-seeded as a fresh run would be, from ``--seed`` + the checkpoint's
  step (``parallel.initialize.seed_everything``, TP-aware for dropout), and rank 0 says so. Dropout
  masks and any sampling drawn from the global RNGs then differ from the uninterrupted run's; with
  dropout off (the default of the supported models) the next steps equal it within the layouts'
  numerical tolerance. Data order, rollout sampling and prompt shuffling use their own seeded
  generators and are not affected.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from parallel.initialize import seed_everything

LAYOUT_KEYS = ("world_size", "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
               "expert_model_parallel_size", "expert_tensor_parallel_size", "data_parallel_size")
_SHORT = {"tensor_model_parallel_size": "TP", "pipeline_model_parallel_size": "PP", "context_parallel_size": "CP",
          "expert_model_parallel_size": "EP", "expert_tensor_parallel_size": "ETP", "data_parallel_size": "DP"}


def current_layout() -> dict[str, int]:
    """This rank's grid, from Megatron's parallel state (the role's own world under Ray)."""
    return {
        "world_size": dist.get_world_size(),
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "context_parallel_size": ps.get_context_parallel_world_size(),
        "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
        "expert_tensor_parallel_size": ps.get_expert_tensor_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
    }


def describe_layout(layout: dict | None) -> str:
    if not layout:
        return "an unrecorded layout"
    parts = [f"{_SHORT[k]}{layout[k]}" for k in LAYOUT_KEYS[1:] if k in layout]
    return f"{' x '.join(parts)} ({layout.get('world_size', '?')} ranks)"


def same_layout(saved: dict | None, now: dict, *, saved_ranks: int) -> bool:
    """Whether each rank's saved state is this rank's. A checkpoint from before layouts were recorded
    counts as the same layout when it holds one RNG state per rank of this world (as resumed then)."""
    if saved is None:
        return saved_ranks == now["world_size"]
    return all(saved.get(k) == now[k] for k in LAYOUT_KEYS)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("tracker") is not None:  # absent in checkpoints written before it was saved
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def reseed(seed: int, step: int) -> int:
    """The RNG of a resume at another layout: every rank seeded as a fresh run with ``seed + step``
    (deterministic: the same resume draws the same numbers). The seed used."""
    seed_everything(seed + step)
    return seed + step
