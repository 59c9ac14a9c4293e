"""Start N local ranks the way torchrun does, for CLIs that can be run with a plain ``python``.

Under torchrun (``RANK`` in the environment) the function runs in place; otherwise it starts
``world_size`` processes (one included: the caller's process stays free of distributed state)
with torchrun's environment variables, and fails if any rank fails.

Ranks are forked from multiprocessing's forkserver with torch, megatron-core and transformers
preloaded: importing them costs ~10 s of CPU per process, which dominated short jobs and
multi-rank tests. The server is a fresh process that never touches CUDA or starts threads, so
forking it is safe; ranks take the caller's environment explicitly (the server's is older).
"""
from __future__ import annotations

import multiprocessing
import os
from typing import Any, Callable

import torch.multiprocessing as mp

from parallel.ports import free_port

PRELOAD_MODULES = ("torch", "megatron.core.models.gpt.gpt_model", "megatron.core.pipeline_parallel", "transformers")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ




def rank_process_context(preload: tuple[str, ...] = PRELOAD_MODULES):
    """The multiprocessing context ranks are started from (forkserver with ``preload`` imported)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    return context


def adopt_environment(env: dict[str, str]) -> None:
    """In a forked rank: take the launcher's environment; thread counts too (torch read them at import)."""
    os.environ.clear()
    os.environ.update(env)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _rank_main(rank: int, fn: Callable, world_size: int, port: int, env: dict, args: tuple) -> None:
    adopt_environment(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    fn(*args)


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args) -> None:
    """Run ``fn(*args)`` on every rank of a ``world_size`` world (spawned here unless torchrun did)."""
    if launched_by_torchrun():
        if int(os.environ["WORLD_SIZE"]) != world_size:
            raise ValueError(
                f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but the parallel sizes need {world_size} ranks"
            )
        fn(*args)
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    rank_process_context()  # sets the preload of the forkserver start_processes uses
    mp.start_processes(_rank_main, args=(fn, world_size, free_port(), dict(os.environ), args), nprocs=world_size,
                       start_method="forkserver")
