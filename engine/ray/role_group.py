"""A role (actor, critic, reference, reward) as a group of Ray actors forming one torch world.

    group = RoleGroup(RoleConfig(name="actor", ...), placement=...)
    log_probs = group.per_sample(lambda w, ref: w.compute_log_probs.remote(ref, 8), batch)

Placement (``engine.ray.colocation``): on GPU nodes every rank takes one GPU (a fraction when
roles are colocated and share a placement group's bundles); on CPU-only clusters ranks reserve
no resources (the processes share the machine's cores, as everything does on a laptop-sized box)
beyond the token CPU that puts colocated ranks into their shared bundle.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import ray
import torch

from engine.ray.colocation import Placement
from engine.ray.role_worker import RemoteRoleWorker, RoleConfig, ShardResult


class RoleError(RuntimeError):
    """A rank of a role failed or died (the message names the role and rank)."""


class RoleGroup:
    def __init__(self, config: RoleConfig, placement: Placement | None = None, *, offload: bool = False,
                 timeout_s: float = 1800.0):
        """``offload`` (``--ref_reward_offload``, frozen roles): the weights live in host memory
        except during this group's forward passes (``per_sample``)."""
        self.config = config
        self.timeout_s = timeout_s
        self.offload = offload
        placement = placement or Placement()
        # rank i in bundle i: the ranks of colocated roles pair up device by device
        self.bundle_indices = list(range(config.num_ranks)) if placement.placement_group is not None else None
        self.workers = [self._start(rank, placement) for rank in range(config.num_ranks)]
        master_addr, master_port = self._get([self.workers[0].address.remote()], "rendezvous")[0]
        self._get([w.setup.remote(master_addr, master_port) for w in self.workers], "start-up")
        if offload:
            self.run(lambda w: w.offload_weights.remote(), "weight offload")

    def _start(self, rank: int, placement: Placement):
        options: dict = {"num_cpus": placement.cpu_per_rank, "num_gpus": placement.gpu_per_rank,
                         "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}}}
        if placement.placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement.placement_group, placement_group_bundle_index=self.bundle_indices[rank])
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

    @contextmanager
    def weights_on_device(self):
        """With ``offload``: weights on the accelerator inside the block, in host memory after it."""
        if not self.offload:
            yield
            return
        self.run(lambda w: w.onload_weights.remote(), "weight onload")
        try:
            yield
        finally:
            self.run(lambda w: w.offload_weights.remote(), "weight offload")

    def per_sample(self, call: Callable, batch: dict, what: str) -> torch.Tensor:
        """Per-sample outputs (``[B, ...]``) assembled from the data-parallel share heads."""
        batch_ref = ray.put(batch)
        with self.weights_on_device():
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
