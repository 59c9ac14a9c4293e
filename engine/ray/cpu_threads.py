"""How many torch threads a CPU rank of a role computes with (GPU ranks are left alone).

Role ranks start with one thread (``OMP_NUM_THREADS=1``): the processes of a Ray cluster share
each node's cores. In the RL loop without ``--async_train`` the engines are idle while the roles
score and train, and the roles compute one at a time, so the computing role's ranks can take the
whole node: ``node cores // its ranks on that node`` threads each. With ``--async_train`` the
engines generate during scoring and training and keep the cores they were started with; the
roles stay at one thread per rank.
"""
from __future__ import annotations

from collections import Counter


def rank_threads(*, node_cores: int, ranks_on_node: int) -> int:
    """Threads of one rank when its role is the only thing computing on its node."""
    return max(1, node_cores // max(ranks_on_node, 1))


def ranks_per_node(node_ids: list[str]) -> list[int]:
    """For each rank (in rank order), how many ranks of its role share its node."""
    counts = Counter(node_ids)
    return [counts[node] for node in node_ids]
