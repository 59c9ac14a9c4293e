"""The test harness's own guarantee: a rendezvous port taken between choosing and binding it is retried
(CI once lost a run to a raylet taking the port: EADDRINUSE on rank 0, rank 1 waiting 300 s)."""
from __future__ import annotations

import socket

import tests.dist_harness as harness
from parallel.ports import free_port


def _all_reduce_ones(rank, world_size):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    ones = torch.ones(1)
    dist.all_reduce(ones)
    return ones.item()


def test_a_taken_rendezvous_port_is_retried_on_a_new_one(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        chosen = []

        def next_port():
            chosen.append(next(ports, None) or free_port())
            return chosen[-1]

        monkeypatch.setattr(harness, "free_port", next_port)
        assert harness.run_distributed(_all_reduce_ones, world_size=2, timeout=60) == [2.0, 2.0]
    assert len(chosen) == 2 and chosen[0] != chosen[1]
