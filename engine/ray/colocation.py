"""Which roles share devices: ``--colocate_actor_ref``, ``--colocate_critic_reward``,
``--colocate_all_models`` (OpenRLHF's flags and semantics).

Colocated roles share one placement group: rank ``i`` of every role in the set lands in bundle
``Placement.bundle_order[i]`` (the group's bundles sorted by node and GPU, so consecutive ranks -
a TP group - share a node wherever the node sizes allow it). On GPU a bundle is one GPU and each
colocated rank takes ``1 / len(set)`` of it (under ``--colocate_all_models`` the vLLM engines'
workers take a share too); on a CPU-only cluster a bundle holds a token CPU fraction, so the
grouping is real Ray placement (and testable) while the processes still share the machine's
cores like every uncolocated rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import ray

from engine.ray.config import ColocationConfig  # noqa: F401  (declared apart: the parsers import no torch)

# CPU reserved per colocated rank on CPU-only clusters: enough for Ray to place it in its
# bundle, too little to limit how many processes a small box runs.
CPU_TOKEN = 0.01
PLACEMENT_TIMEOUT_S = 600.0


@dataclass
class Placement:
    """Where a role's ranks go: a placement group (bundle ``bundle_order[i]`` for rank ``i``) and
    what each rank takes."""

    placement_group: object | None = None
    gpu_per_rank: float = 0.0
    cpu_per_rank: float = 0.0
    node_ids: tuple[str, ...] = ()  # no group on a multi-node CPU-only cluster: rank i's node (see NodeDealer)
    bundle_order: tuple[int, ...] = ()  # rank -> bundle, sorted by node and GPU (empty: bundle i for rank i)

    def bundle_index(self, rank: int) -> int:
        return self.bundle_order[rank] if self.bundle_order else rank


def gpus_available() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def make_placement(num_ranks: int, *, num_roles_sharing: int = 1, with_engines: bool = False) -> Placement:
    """A placement group of ``num_ranks`` bundles shared by ``num_roles_sharing`` roles (and, on
    GPU ``with_engines``, by one vLLM worker per bundle); uncolocated ranks on a CPU-only cluster
    reserve nothing."""
    sharing = num_roles_sharing + int(with_engines)
    if gpus_available():
        group = _reserve([{"GPU": 1, "CPU": 1}] * num_ranks)
        # Ray counts resources in units of 1e-4: round down so that the shares fit in one GPU.
        return Placement(placement_group=group, gpu_per_rank=math.floor(1e4 / sharing) / 1e4,
                         bundle_order=rank_order(gpu_bundle_sites(group)))
    if num_roles_sharing == 1:
        return Placement()
    group = _reserve([{"CPU": CPU_TOKEN * num_roles_sharing}] * num_ranks)
    return Placement(placement_group=group, cpu_per_rank=CPU_TOKEN, bundle_order=rank_order(bundle_sites(group)))


@dataclass(frozen=True)
class BundleSite:
    """Where Ray put one bundle of a placement group: its node and (GPU bundles) its GPU id."""

    node_id: str
    gpu_id: int | str | None = None


def rank_order(sites: list[BundleSite]) -> tuple[int, ...]:
    """The bundle index for each rank (``sites[i]``: bundle i): nodes in order of their first
    bundle, within a node by GPU id, then by index.

    PACK does not keep a node's bundles contiguous (past 16 equal bundles Ray's sort reorders
    them, e.g. bundle 0 on node A, 1-6 on B, 7-17 on A), so "rank i in bundle i" can split a TP
    group (consecutive ranks) over two nodes; slime sorts its bundles by node and GPU id for the
    same reason. The GPU order keeps a TP group on neighbouring GPUs and local ranks in device order."""
    node_rank: dict[str, int] = {}
    for site in sites:
        node_rank.setdefault(site.node_id, len(node_rank))

    def key(index: int) -> tuple:
        gpu = sites[index].gpu_id
        # GPU ids are ints, or strings (UUIDs) where CUDA_VISIBLE_DEVICES names devices so.
        gpu_key = (0, int(gpu), "") if str(gpu).isdigit() else (1, 0, str(gpu or ""))
        return node_rank[sites[index].node_id], gpu_key, index

    return tuple(sorted(range(len(sites)), key=key))


def bundle_sites(group) -> list[BundleSite]:
    """Each bundle's node, from Ray's placement group table (no process needed)."""
    from ray.util.placement_group import placement_group_table

    nodes = placement_group_table(group)["bundles_to_node_id"]
    return [BundleSite(nodes[index]) for index in range(len(nodes))]


# What a probe task takes of its bundle's GPU: Ray's smallest unit, so it never waits for a rank.
GPU_PROBE_SHARE = 1e-4


@ray.remote(num_cpus=0, num_gpus=GPU_PROBE_SHARE)
def _where_am_i() -> tuple[str, int | str]:
    return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()[0]


def gpu_bundle_sites(group) -> list[BundleSite]:
    """Each GPU bundle's node and GPU id, told by a tiny task in every bundle (Ray's table knows
    the node but not which of the node's GPUs a bundle holds)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    refs = [_where_am_i.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=index)).remote() for index in range(group.bundle_count)]
    return [BundleSite(node, gpu) for node, gpu in ray.get(refs, timeout=PLACEMENT_TIMEOUT_S)]


def _reserve(bundles: list[dict], timeout_s: float = PLACEMENT_TIMEOUT_S):
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group(bundles, strategy="PACK")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as err:
        remove_placement_group(group)
        raise RuntimeError(f"the cluster did not offer {len(bundles)} x {bundles[0]} within {timeout_s:.0f} s "
                           "(see --<role>_num_nodes / --<role>_num_gpus_per_node and the colocation flags)") from err
    return group


def colocated_sets(config: ColocationConfig, ranks: dict[str, int], *, engine_workers: int = 0) -> list[list[str]]:
    """The sets of roles (keys of ``ranks``: role -> number of ranks) that share a placement group.

    Roles in a set must have as many ranks as each other (and, under ``--colocate_all_models``,
    as the engines have workers): the error names the flags to change."""
    rewards = sorted(r for r in ranks if r.startswith("reward"))
    flagged: list[tuple[str, list[str]]] = []
    if config.colocate_all_models:
        flagged.append(("--colocate_all_models", list(ranks)))
    else:
        if config.colocate_actor_ref and "ref" in ranks:
            flagged.append(("--colocate_actor_ref", ["actor", "ref"]))
        if config.colocate_critic_reward and "critic" in ranks and rewards:
            flagged.append(("--colocate_critic_reward", ["critic", *rewards]))
    for flag, members in flagged:
        counts = {role: ranks[role] for role in members}
        if len(set(counts.values())) > 1:
            raise ValueError(f"{flag} needs the same number of ranks for {', '.join(members)} "
                             f"(--<role>_num_nodes x --<role>_num_gpus_per_node), got {counts}")
    if config.colocate_all_models and engine_workers and engine_workers != ranks["actor"]:
        raise ValueError(f"--colocate_all_models puts one vLLM worker on each actor rank's device: "
                         f"--vllm_num_engines x --vllm_tensor_parallel_size ({engine_workers}) must equal the "
                         f"actor's ranks ({ranks['actor']})")
    return [members for _, members in flagged]


def make_placements(config: ColocationConfig, ranks: dict[str, int], *, engine_workers: int = 0) -> dict[str, Placement]:
    """One Placement per role (colocated roles get the same one); ``"vllm"`` too under
    ``--colocate_all_models`` on GPU (the engines' bundles)."""
    placements: dict[str, Placement] = {}
    with_engines = config.colocate_all_models and engine_workers > 0 and gpus_available()
    for members in colocated_sets(config, ranks, engine_workers=engine_workers):
        if len(members) == 1 and not with_engines:
            continue
        shared = make_placement(ranks[members[0]], num_roles_sharing=len(members), with_engines=with_engines)
        placements.update({role: shared for role in members})
        if with_engines:
            placements["vllm"] = shared
    for role, num in ranks.items():
        if role not in placements:
            placements[role] = make_placement(num)
    return placements


class NodeDealer:
    """Deals the processes that reserve nothing (uncolocated ranks and engines on a CPU-only
    cluster) over the alive nodes in turn, the driver's node first: without it Ray would put
    every zero-CPU actor on the driver's node and a multi-node CPU cluster would use one node.
    A role's ranks go to one node together (``pin``): dealt one by one, its TP groups would
    straddle nodes; each engine (its TP workers are its own processes) takes the next node
    (``deal``). Where there is one node, or GPUs (resources decide), it deals nothing."""

    def __init__(self, node_ids: list[str]):
        self.node_ids, self.next = node_ids, 0

    @classmethod
    def of_cluster(cls) -> "NodeDealer":
        if gpus_available():
            return cls([])
        here = ray.get_runtime_context().get_node_id()
        others = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here)
        return cls([here, *others] if others else [])

    def deal(self, count: int) -> tuple[str, ...]:
        """A node for each of ``count`` independent processes, in turn."""
        if not self.node_ids:
            return ()
        dealt = tuple(self.node_ids[(self.next + i) % len(self.node_ids)] for i in range(count))
        self.next += count
        return dealt

    def pin(self, placement: Placement, num_ranks: int) -> Placement:
        """``placement`` with the next node for all ``num_ranks`` ranks of a role, unless it
        already has a placement group. One node per role keeps every model-parallel group (TP,
        CP, PP: each talks at every step, over gloo here) on one node; CPU ranks reserve
        nothing, so a node always has room."""
        if placement.placement_group is not None:
            return placement
        return replace(placement, node_ids=self.deal(1) * num_ranks)


def node_affinity(node_id: str):
    """Run on ``node_id`` (an alive node when dealt). Hard: a soft affinity let Ray fall back to the
    driver's node under load, which is the pile-up dealing exists to avoid."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def release_placements(placements: dict[str, Placement]) -> None:
    from ray.util.placement_group import remove_placement_group

    groups = {id(p.placement_group): p.placement_group for p in placements.values() if p.placement_group is not None}
    for group in groups.values():
        remove_placement_group(group)


def describe_placement(groups: dict, pool) -> str:
    """One line saying which Ray node each role rank and engine (of the ``EnginePool``) runs on
    (nodes numbered by first use)."""
    where = {f"{key} rank {rank}": node for key, group in groups.items() for rank, node in enumerate(group.node_ids())}
    where.update({f"engine {i}": node for i, node in enumerate(pool.node_ids())})
    numbers: dict[str, int] = {}
    for node in where.values():
        numbers.setdefault(node, len(numbers))
    return "placement: " + ", ".join(f"{name} on node {numbers[node]} ({node[:8]})" for name, node in where.items())


def current_placement_group_id() -> str | None:
    """Id of the placement group Ray scheduled this worker into (None outside any)."""
    return ray.get_runtime_context().get_placement_group_id()
