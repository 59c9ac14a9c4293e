"""Run a job on its ranks: in place under torchrun (one node or many), or on local ranks started
here the way torchrun would, for CLIs run with a plain ``python``.

Under torchrun (``RANK`` in the environment) the world is torchrun's and data parallelism is
what the model-parallel grid leaves of it, as in Megatron; a world the grid does not divide is
refused before any process group forms. Otherwise ``--nproc_per_node`` processes are started
(one included: the caller's process stays free of distributed state) with torchrun's
environment variables, and the launch fails if any rank fails. Ranks die with their launcher
(``parallel.lifetime``): none trains on headless after a kill -9 of torchrun or of the CLI.

On CPU, ranks are forked from multiprocessing's forkserver with torch, megatron-core and
transformers preloaded: importing them costs ~10 s of CPU per process, which dominated short jobs
and multi-rank tests. The server is a fresh process that starts no threads, so forking it is
safe; ranks take the caller's environment explicitly (the server's is older). With CUDA, ranks
are spawned instead (see ``rank_start_method``).
"""
from __future__ import annotations

import multiprocessing
import os
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from parallel.config import ParallelConfig
from parallel.errors import LaunchError  # noqa: F401  (raised here; the CLIs catch it without importing torch)
from parallel.lifetime import die_with, die_with_parent
from parallel.ports import free_port

# parallel.forkserver_lifetime first: the server dies with its launcher from then on; and its
# package's import (parallel/__init__.py) installs the filters of megatron-core's import-time
# warnings before megatron is imported in the forkserver.
PRELOAD_MODULES = ("parallel.forkserver_lifetime", "torch", "megatron.core.models.gpt.gpt_model",
                   "megatron.core.pipeline_parallel", "transformers")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank_start_method(cuda: bool | None = None) -> str:
    """forkserver on CPU; spawn when CUDA is present: the preload imports Transformer Engine through
    megatron's gpt_model, TE initialises CUDA when it loads its kernels, and a process forked from
    one that initialised CUDA fails on its first CUDA call."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return "spawn" if cuda else "forkserver"


def rank_process_context(preload: tuple[str, ...] = PRELOAD_MODULES, *, cuda: bool | None = None):
    """The multiprocessing context ranks are started from (a forkserver has ``preload`` imported)."""
    context = multiprocessing.get_context(rank_start_method(cuda))
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(list(preload))
    return context


def adopt_environment(env: dict[str, str]) -> None:
    """In a forked rank: take the launcher's environment; thread counts too (torch read them at import)."""
    os.environ.clear()
    os.environ.update(env)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _rank_main(rank: int, fn: Callable, world_size: int, port: int, launcher: int, env: dict, args: tuple) -> None:
    # The launcher, not the parent: a forkserver's ranks are its children, and it lives as long as they do.
    die_with(launcher)
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


def check_world(grid: ParallelConfig, world_size: int, source: str) -> int:
    """The data-parallel size of ``world_size`` ranks on ``grid``; ``source`` says where the number came from."""
    try:
        return grid.data_parallel_size(world_size)
    except ValueError as exc:
        raise LaunchError(f"{source}: {exc}") from None


def check_torchrun_world(grid: ParallelConfig, nproc_per_node: int | None) -> int:
    """Under torchrun the world is torchrun's: DP is what remains of it after TP x PP x CP."""
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if nproc_per_node is not None and nproc_per_node != local:
        raise LaunchError(
            f"--nproc_per_node {nproc_per_node} was given to the job, but torchrun started {local} ranks per node: "
            "under torchrun the ranks are torchrun's (pass --nproc_per_node to torchrun only)"
        )
    return check_world(grid, world, f"torchrun started WORLD_SIZE={world} ranks (--nnodes x --nproc_per_node)")


def run_on_ranks(fn: Callable[..., Any], *args, grid: ParallelConfig, nproc_per_node: int | None = None) -> None:
    """Run ``fn(*args)`` on every rank of a world that fits ``grid``.

    Under torchrun, in place: the world is torchrun's (any multiple of the grid, one node or many)
    and data parallelism takes the rest. Otherwise ``nproc_per_node`` local ranks are spawned here,
    by default the smallest world the grid fits (TP x PP x CP, times what EP needs of DP).
    """
    nprocs = check_launch(grid, nproc_per_node)
    if launched_by_torchrun():
        die_with_parent()  # torchrun's agent: a rank never trains on after its launcher died
        fn(*args)
        return
    spawn_local_ranks(fn, nprocs, *args)


def check_launch(grid: ParallelConfig, nproc_per_node: int | None) -> int:
    """The world this launch makes fits ``grid`` (LaunchError otherwise); returns the ranks to spawn here."""
    if launched_by_torchrun():
        check_torchrun_world(grid, nproc_per_node)
        return 0
    nprocs = nproc_per_node or grid.minimum_world_size()
    check_world(grid, nprocs, f"--nproc_per_node {nprocs}")
    return nprocs


def spawn_local_ranks(fn: Callable[..., Any], world_size: int, *args) -> None:
    """``fn(*args)`` on ``world_size`` ranks spawned on this machine; fails if any rank fails."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    context = rank_process_context()  # a forkserver's preload is set on the context start_processes uses
    mp.start_processes(_rank_main, args=(fn, world_size, free_port(), os.getpid(), dict(os.environ), args),
                       nprocs=world_size, start_method=context.get_start_method())
