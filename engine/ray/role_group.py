"""A role (actor, critic, reference, reward) as a group of Ray actors forming one torch world.

    group = RoleGroup(RoleConfig(name="actor", ...), placement=...)
    log_probs = group.per_sample(lambda w, ref: w.compute_log_probs.remote(ref, 8), batch)

Placement: on GPU nodes every rank takes one GPU (a fraction when roles are colocated and share
a placement group's bundles); on CPU-only clusters ranks reserve no resources (the processes
share the machine's cores, as everything does on a laptop-sized box).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import ray
import torch

from engine.ray.role_worker import RemoteRoleWorker, RoleConfig, ShardResult


class RoleError(RuntimeError):
    """A rank of a role failed or died (the message names the role and rank)."""


@dataclass
class Placement:
    """Where a role's ranks go: a placement group and the GPU fraction each rank takes."""

    placement_group: object | None = None
    gpu_per_rank: float = 0.0


def gpus_available() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def make_placement(num_ranks: int, *, num_roles_sharing: int = 1) -> Placement:
    """One bundle per rank; ``num_roles_sharing`` colocated roles split each GPU between them."""
    if not gpus_available():
        return Placement()
    from ray.util.placement_group import placement_group

    group = placement_group([{"GPU": 1, "CPU": 1}] * num_ranks, strategy="PACK")
    ray.get(group.ready())
    return Placement(placement_group=group, gpu_per_rank=1.0 / num_roles_sharing)


class RoleGroup:
    def __init__(self, config: RoleConfig, placement: Placement | None = None, *, timeout_s: float = 1800.0):
        self.config = config
        self.timeout_s = timeout_s
        placement = placement or Placement()
        self.workers = [self._start(rank, placement) for rank in range(config.num_ranks)]
        master_addr, master_port = self._get([self.workers[0].address.remote()], "rendezvous")[0]
        self._get([w.setup.remote(master_addr, master_port) for w in self.workers], "start-up")

    def _start(self, rank: int, placement: Placement):
        options: dict = {"num_cpus": 0, "num_gpus": placement.gpu_per_rank,
                         "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}}}
        if placement.placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement.placement_group, placement_group_bundle_index=rank)
        return RemoteRoleWorker.options(**options).remote(self.config, rank)

    def _get(self, refs: list, what: str) -> list:
        """Results of one call per rank; a failed or dead rank raises naming role and rank."""
        results, deadline = [], time.monotonic() + self.timeout_s
        for rank, ref in enumerate(refs):
            try:
                results.append(ray.get(ref, timeout=max(deadline - time.monotonic(), 1.0)))
            except ray.exceptions.GetTimeoutError as err:
                raise RoleError(f"{self.config.name} rank {rank} did not finish {what} in {self.timeout_s:.0f}s") from err
            except ray.exceptions.RayError as err:
                cause = getattr(err, "cause", None) or err
                raise RoleError(f"{self.config.name} rank {rank} failed during {what}: {cause}") from err
        return results

    def run(self, call: Callable, what: str, *args) -> list:
        """``call(worker, *args)`` on every rank (e.g. ``lambda w: w.save_hf.remote(path)``)."""
        return self._get([call(w, *args) for w in self.workers], what)

    def per_sample(self, call: Callable, batch: dict, what: str) -> torch.Tensor:
        """Per-sample outputs (``[B, ...]``) assembled from the data-parallel share heads."""
        batch_ref = ray.put(batch)
        shards: list[ShardResult] = [r for r in self.run(call, what, batch_ref) if r is not None]
        size = len(batch["input_ids"])
        filled = [s for s in shards if s.values]
        out = torch.zeros((size, *filled[0].values["out"].shape[1:])) if filled else torch.zeros(size)
        covered = 0
        for shard in filled:
            out[shard.start:shard.stop] = shard.values["out"]
            covered += shard.stop - shard.start
        if covered != size:
            raise RoleError(f"{self.config.name}: results cover {covered} of {size} samples")
        return out

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
