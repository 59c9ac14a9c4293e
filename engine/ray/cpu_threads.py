"""How many torch threads a CPU rank of a role computes with (GPU ranks are left alone).

Role ranks start with one thread (``OMP_NUM_THREADS=1``): the processes of a Ray cluster share
each machine's cores. The RL loop runs the roles one at a time (scoring, then training), so the
computing role's ranks can take the whole machine: ``cores // its ranks on that machine`` threads
each (several Ray nodes may share one machine, as the two-node test clusters do). Without
``--async_train`` the engines are idle meanwhile; with it they generate during the first part of
training on the core vLLM binds them to, and the trainer's threads share it (on the 2-core box
the async training phase took 4.45 s with two threads, 5.12 s with one, in separate runs of
tools/bench/bench_rl_step).
"""
from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path


def rank_threads(*, machine_cores: int, ranks_on_machine: int) -> int:
    """Threads of one rank when its role is the only thing computing on its machine."""
    return max(1, machine_cores // max(ranks_on_machine, 1))


def machine_id() -> str:
    """This machine's identity: the kernel's boot id (the same for every Ray node started on one
    machine, as the two-node test clusters on one box are), else the host name."""
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    return boot_id.read_text().strip() if boot_id.exists() else socket.gethostname()


def ranks_per_machine(machine_ids: list[str]) -> list[int]:
    """For each rank (in rank order), how many ranks of its role share its machine."""
    counts = Counter(machine_ids)
    return [counts[machine] for machine in machine_ids]
