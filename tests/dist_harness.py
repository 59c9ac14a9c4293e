"""Run a test body on N gloo ranks in new processes, with a timeout and every rank's traceback.

    from tests.dist_harness import run_distributed

    def _body(rank, world_size, scale):      # module level, so spawn can pickle it
        ...
        return some_picklable_result

    results = run_distributed(_body, world_size=2, args=(2.0,), timeout=120)

Each rank gets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``/``LOCAL_RANK`` in its
environment (what torchrun sets), so code under test initialises exactly as it does in production.
A rank that raises, dies or hangs fails the test with a report naming every rank's failure.
"""
from __future__ import annotations

import os
import pickle
import traceback
from typing import Any, Callable

from parallel.launch import adopt_environment, rank_process_context
from parallel.ports import free_port

# Forked from a server with torch / megatron-core / transformers imported (parallel/launch.py).
_CTX = rank_process_context()


class DistributedTestError(AssertionError):
    pass


# Another process (a Ray raylet, a vLLM engine, another xdist worker) can take the port between
# ``free_port`` and rank 0's TCPStore binding it; a new port is then the whole remedy.
_PORT_TAKEN = "EADDRINUSE"
_PORT_ATTEMPTS = 3


def _worker(fn, rank, world_size, port, args, kwargs, env, queue):
    adopt_environment(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        result = fn(rank, world_size, *args, **kwargs)
        # Plain pickle: torch's queue reducers would share memory with a process about to exit.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes; return results by rank.

    A rendezvous port taken by another process before rank 0 binds it is retried on a new port."""
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        results, failures = _run_once(fn, world_size, args, kwargs, timeout, env)
        port_taken = any(_PORT_TAKEN in msg for msg in failures.values())
        if not (port_taken and attempt < _PORT_ATTEMPTS):
            break
    if failures:
        report = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(failures.items()))
        raise DistributedTestError(f"{len(failures)} of {world_size} ranks failed:\n{report}")
    return [results[r] for r in range(world_size)]


def _run_once(fn, world_size, args, kwargs, timeout, env) -> tuple[dict[int, Any], dict[int, str]]:
    queue = _CTX.Queue()
    port = free_port()
    base_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    procs = [
        _CTX.Process(
            target=_worker,
            args=(fn, rank, world_size, port, args, kwargs or {}, base_env, queue),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    import queue as queue_module
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(failures) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            rank, ok, payload = queue.get(timeout=min(remaining, 1.0))
        except queue_module.Empty:
            # A rank killed by a signal never reports: do not wait for it until the deadline.
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
            if dead and all(r in failures or r in dead for r in range(world_size) if r not in results):
                for r in dead:
                    failures.setdefault(r, f"process exited with code {procs[r].exitcode}")
                break
            continue
        if ok:
            results[rank] = pickle.loads(payload)
        else:
            failures[rank] = payload
            if _PORT_TAKEN in payload:
                break  # the other ranks wait for a store that never opens
    timed_out = len(results) + len(failures) < world_size
    why_missing = (f"no result within {timeout:.0f}s (hung or deadlocked)" if time.monotonic() >= deadline
                   else "stopped: another rank could not open the rendezvous")
    for proc in procs:
        proc.join(timeout=5 if not timed_out and not failures else 0.1)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if timed_out:
        missing = [r for r in range(world_size) if r not in results and r not in failures]
        for r in missing:
            failures[r] = why_missing
    return results, failures
