"""Start N local ranks the way torchrun does, for CLIs that can be run with a plain ``python``.

Under torchrun (``RANK`` in the environment) the function runs in place; otherwise it spawns
``world_size`` processes (one included: the caller's process stays free of distributed state)
with torchrun's environment variables, and fails if any rank fails.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch.multiprocessing as mp


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
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
    mp.start_processes(_rank_main, args=(fn, world_size, _free_port(), args), nprocs=world_size, start_method="spawn")
