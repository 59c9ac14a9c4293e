"""A role (actor, critic, reference, reward) as a group of Ray actors forming one torch world.

    group = RoleGroup(RoleConfig(name="actor", engine=EngineConfig(...), num_ranks=2, trainable=True))
    log_probs = group.log_probs(experience, micro_batch_size=8)      # [B, L], from the DP share heads
    metrics = group.train(experience, "policy", settings)

Every method is a typed call on the ranks' handles, waited on with a deadline; a failed or dead
rank raises ``RoleError`` naming the role and the rank. Placement (``engine.ray.colocation``):
on GPU nodes every rank takes one GPU (a fraction when roles are colocated and share a placement
group's bundles); on CPU-only clusters ranks reserve no resources (the processes share the
machine's cores, as everything does on a laptop-sized box) beyond the token CPU that puts
colocated ranks into their shared bundle.
"""
from __future__ import annotations

import ray
import torch

from engine.ray.calls import get_each
from engine.ray.colocation import Placement, node_affinity
from engine.ray.cpu_threads import ranks_per_machine
from engine.ray.role_worker import RemoteRoleWorker, RoleConfig, ShardResult, routing_mismatch
from engine.rl.experience import Experience
from engine.rl.train_losses import LossKind, TrainSettings
from parallel.weight_transfer import SyncStats


class _SharedObject:
    """One object-store copy of the object the roles were handed last (a rollout's experience, its
    ptx rows): the reference, reward, critic and actor groups read the same copy instead of each
    putting its own."""

    def __init__(self):
        self._object, self._ref = None, None

    def ref(self, obj):
        if obj is None or isinstance(obj, ray.ObjectRef):
            return obj
        if obj is not self._object:
            self._object, self._ref = obj, ray.put(obj)
        return self._ref


_SHARED = _SharedObject()


def rank_placement_options(placement: Placement, rank: int) -> dict:
    """Ray options that put ``rank`` where ``placement`` says (its bundle, or its dealt node)."""
    options: dict = {"num_cpus": placement.cpu_per_rank, "num_gpus": placement.gpu_per_rank}
    if placement.placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement.placement_group, placement_group_bundle_index=placement.bundle_index(rank))
    elif placement.node_ids:
        options["scheduling_strategy"] = node_affinity(placement.node_ids[rank])
    return options


def _summed(per_rank: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for moved in per_rank:
        for part, nbytes in moved.items():
            total[part] = total.get(part, 0) + nbytes
    return total


class RoleError(RuntimeError):
    """A rank of a role failed or died (the message names the role and rank)."""


class RoleGroup:
    def __init__(self, config: RoleConfig, placement: Placement | None = None, *, timeout_s: float = 1800.0,
                 wait: bool = True):
        """Start the role's ranks; ``wait=False``: return while they boot (import Megatron, build and
        load the model), so the caller starts the other roles and the engines meanwhile and joins
        them with ``wait_ready``."""
        self.config = config
        self.timeout_s = timeout_s
        placement = placement or Placement()
        # Rank i in the placement's i-th bundle (grouped by node, so a TP group stays on one node);
        # colocated roles share the Placement, so their ranks pair up device by device.
        self.bundle_indices = ([placement.bundle_index(rank) for rank in range(config.num_ranks)]
                               if placement.placement_group is not None else None)
        self.workers = [self._start(rank, placement) for rank in range(config.num_ranks)]
        # Ray hands rank 0's address to every rank's setup once rank 0 has answered.
        rendezvous = self.workers[0].address.remote()
        self._booting = [w.setup.remote(rendezvous) for w in self.workers]
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every rank has built its model; a rank that failed is named."""
        booting, self._booting = self._booting, []
        if booting:
            self._wait(booting, "start-up")

    def _start(self, rank: int, placement: Placement):
        options = rank_placement_options(placement, rank)
        options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}}
        return RemoteRoleWorker.options(**options).remote(self.config, rank)

    def _wait(self, refs: list, what: str) -> list:
        names = [f"{self.config.name} rank {rank}" for rank in range(len(refs))]
        return get_each(refs, names=names, timeout_s=self.timeout_s, what=what, error=RoleError)

    # ----- per-sample outputs, assembled from the data-parallel share heads --------------------
    def _per_sample(self, refs: list, batch_size: int, what: str) -> torch.Tensor:
        return self._per_sample_and_metrics(refs, batch_size, what)[0]

    def _per_sample_and_metrics(self, refs: list, batch_size: int, what: str) -> tuple[torch.Tensor, dict]:
        shards: list[ShardResult] = [r for r in self._wait(refs, what) if r is not None]
        filled = [s for s in shards if s.values is not None]
        out = torch.zeros((batch_size, *filled[0].values.shape[1:])) if filled else torch.zeros(batch_size)
        covered = 0
        for shard in filled:
            rows = shard.row_indices()
            out[rows] = shard.values
            covered += len(rows)
        if covered != batch_size:
            raise RoleError(f"{self.config.name}: results cover {covered} of {batch_size} samples")
        return out, (shards[0].metrics or {}) if shards else {}

    # ``packed``: each micro-batch's rows packed into one (--packing_samples); the same results.
    # ``max_tokens``: micro-batches of at most that many tokens, packed (--use_dynamic_batch_size).
    def log_probs(self, experience: Experience, micro_batch_size: int, *, temperature: float = 1.0,
                  packed: bool = False, max_tokens: int | None = None) -> torch.Tensor:
        """``[B, L]`` log-probs of ``labels`` (read where ``action_mask`` is 1)."""
        ref = _SHARED.ref(experience)
        return self._per_sample([w.compute_log_probs.remote(ref, micro_batch_size, temperature, packed, max_tokens)
                                 for w in self.workers], experience.batch_size, f"{self.config.name} log-probs")

    def log_probs_and_routing(self, experience: Experience, micro_batch_size: int, *, temperature: float = 1.0,
                              packed: bool = False, max_tokens: int | None = None) -> tuple[torch.Tensor, float | None]:
        """``log_probs``, and the share of the tokens the engines routed (``experience.routed_experts``)
        that this MoE model routes otherwise (None: nothing recorded)."""
        ref = _SHARED.ref(experience)
        log_probs, counts = self._per_sample_and_metrics(
            [w.compute_log_probs.remote(ref, micro_batch_size, temperature, packed, max_tokens, True)
             for w in self.workers], experience.batch_size, f"{self.config.name} log-probs")
        return log_probs, routing_mismatch(counts) if counts else None

    def values(self, experience: Experience, micro_batch_size: int, *, packed: bool = False,
               max_tokens: int | None = None) -> torch.Tensor:
        """``[B, L]`` value-head outputs."""
        ref = _SHARED.ref(experience)
        return self._per_sample([w.compute_values.remote(ref, micro_batch_size, packed, max_tokens)
                                 for w in self.workers], experience.batch_size, f"{self.config.name} values")

    def rewards(self, experience: Experience, micro_batch_size: int, *, packed: bool = False,
                max_tokens: int | None = None) -> torch.Tensor:
        """``[B]`` scores at each row's last real token."""
        ref = _SHARED.ref(experience)
        return self._per_sample([w.compute_rewards.remote(ref, micro_batch_size, packed, max_tokens)
                                 for w in self.workers], experience.batch_size, f"{self.config.name} rewards")

    def probe_layers(self, sequences: list[list[int]]) -> list[dict]:
        """Per sequence, the per-layer records of every pipeline stage joined (``MegatronRoleWorker.probe_layers``)."""
        merged: list[dict] = [{} for _ in sequences]
        for stage in self._wait([w.probe_layers.remote(sequences) for w in self.workers], f"{self.config.name} probe"):
            for joined, records in zip(merged, stage or ()):
                joined.update(records)
        return merged

    # ----- training and weights ---------------------------------------------------------------
    def train(self, experience, loss: LossKind, settings: TrainSettings, ptx=None) -> dict:
        """PPO epochs over ``experience`` (with ``ptx`` rows when given); metrics of rank 0."""
        experience_ref = _SHARED.ref(experience)
        ptx_ref = ray.put(ptx) if ptx is not None else None
        return self._wait([w.train.remote(experience_ref, loss, settings, ptx_ref) for w in self.workers],
                          f"{self.config.name} train")[0]

    def open_weight_sync(self, world_size: int, backend: str) -> list[dict]:
        """Every rank opens its side of the sync; the group specs of the sending ranks, rank order."""
        specs = self._wait([w.open_weight_sync.remote(world_size, backend) for w in self.workers], "weight-sync setup")
        return [spec for spec in specs if spec is not None]

    def connect_weight_sync(self) -> None:
        self._wait([w.connect_weight_sync.remote() for w in self.workers], "weight-sync setup")

    def send_weights(self, bucket_bytes: int) -> list[SyncStats | None]:
        return self._wait([w.send_weights.remote(bucket_bytes) for w in self.workers], "weight sync")

    def park_training_state(self, parts: tuple[str, ...]) -> dict[str, int]:
        """Every rank parks ``parts`` in host memory; bytes per part, summed over the ranks."""
        return _summed(self._wait([w.park_training_state.remote(parts) for w in self.workers], "park state"))

    def restore_training_state(self) -> dict[str, int]:
        return _summed(self._wait([w.restore_training_state.remote() for w in self.workers], "restore state"))

    # ----- persistence --------------------------------------------------------------------------
    def save_checkpoint(self, ckpt_config, step: int, state: dict, *, wait: bool = False) -> None:
        """``wait``: complete on return also under --async_save (the run's last checkpoint, a preemption's)."""
        self._wait([w.save_checkpoint.remote(ckpt_config, step, state, wait) for w in self.workers],
                   f"{self.config.name} checkpoint")

    def finish_checkpoint(self) -> None:
        """A background checkpoint (--async_save) in flight written and published."""
        self._wait([w.finish_checkpoint.remote() for w in self.workers], f"{self.config.name} checkpoint")

    def resume(self, ckpt_config) -> dict | None:
        return self._wait([w.resume.remote(ckpt_config) for w in self.workers], f"{self.config.name} resume")[0]

    def save_hf(self, path: str) -> None:
        self._wait([w.save_hf.remote(path) for w in self.workers], f"{self.config.name} HF export")

    def use_machine_cores(self) -> list[int]:
        """CPU ranks take their machine's cores, split between the role's ranks there (for phases
        where nothing else computes); the thread count of each rank."""
        machines = self._wait([w.machine_id.remote() for w in self.workers], "machine lookup")
        per_machine = ranks_per_machine(machines)
        return self._wait([w.use_machine_cores.remote(n) for w, n in zip(self.workers, per_machine)], "thread count")

    def weights_devices(self) -> list[str]:
        return self._wait([w.weights_device.remote() for w in self.workers], "weights device")

    def node_ids(self) -> list[str]:
        """The Ray node of each rank, rank order."""
        return self._wait([w.node_id.remote() for w in self.workers], "node lookup")

    def placement_group_ids(self) -> list[str | None]:
        return self._wait([w.placement_group_id.remote() for w in self.workers], "placement")

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
