"""Rank -> bundle placement across nodes: a TP group (consecutive ranks) must stay on one node.

Ray's PACK strategy does not keep a node's bundles contiguous: past 16 equal bundles its sort
reorders them (bundle 0 on one node, the next few on the other, the rest back on the first), so
"rank i in bundle i" splits TP groups over nodes. Two logical nodes of a ``ray.cluster_utils``
cluster declare GPUs they do not have (Ray counts GPUs as a logical resource and hands out their
ids), so the GPU path of ``make_placement`` runs, its probe tasks included; light tasks stand in
for the Megatron ranks and report their node and GPU.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from engine.ray.cluster import init_ray
from engine.ray.colocation import BundleSite, NodeDealer, Placement, rank_order

REPO = Path(__file__).resolve().parents[1]
GPUS_PER_NODE = 12
NUM_RANKS = 18  # over 16 bundles, not filling the nodes: Ray then interleaves them (seen: 0 | 1-6 | 7-17)
TP = 2  # divides both nodes' shares (12 and 6), as --actor_num_gpus_per_node would


def test_rank_order_sorts_by_node_then_gpu():
    sites = [BundleSite("a", 3), BundleSite("b", 0), BundleSite("b", 1), BundleSite("a", 0), BundleSite("a", 1)]
    assert rank_order(sites) == (3, 4, 0, 1, 2)  # node a (bundle 0's) first, by GPU id
    assert rank_order([BundleSite("x", "10"), BundleSite("x", "9")]) == (1, 0)  # ids as numbers, not text
    assert rank_order([BundleSite("y"), BundleSite("x"), BundleSite("y")]) == (0, 2, 1)  # CPU bundles: by index
    assert rank_order([BundleSite("one", gpu) for gpu in range(4)]) == (0, 1, 2, 3)  # one node: unchanged


def test_a_role_is_dealt_to_one_node_and_engines_in_turn():
    dealer = NodeDealer(["driver", "other"])
    assert dealer.pin(Placement(), 4).node_ids == ("driver",) * 4  # a TP=2 x DP=2 role stays together
    assert dealer.pin(Placement(), 2).node_ids == ("other",) * 2
    assert dealer.deal(3) == ("driver", "other", "driver")  # engines: one node each
    assert NodeDealer([]).pin(Placement(), 2).node_ids == ()  # one node, or GPUs: Ray's resources decide


@pytest.fixture(scope="module")
def two_gpu_nodes():
    """Two Ray nodes of GPUS_PER_NODE logical GPUs; the session's local cluster, if started,
    is shut down meanwhile (a driver joins one cluster at a time) and restarted as conftest does."""
    import ray
    from ray.cluster_utils import Cluster

    session_cluster = ray.is_initialized()
    if session_cluster:
        ray.shutdown()
    root = tempfile.mkdtemp(prefix="rpl", dir="/tmp")  # short: AF_UNIX paths must stay < 108 bytes
    os.makedirs(os.path.join(root, "ray"))
    old_tmpdir = os.environ.get("TMPDIR")
    # Cluster writes its address to $TMPDIR/ray/ray_current_cluster; keep that out of the shared /tmp/ray.
    os.environ["TMPDIR"] = root
    try:
        node = {"num_cpus": GPUS_PER_NODE, "num_gpus": GPUS_PER_NODE, "object_store_memory": 80_000_000}
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False,
                                                                "temp_dir": os.path.join(root, "t")})
        cluster.add_node(**node)
    finally:
        os.environ.pop("TMPDIR") if old_tmpdir is None else os.environ.update(TMPDIR=old_tmpdir)
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        cluster.wait_for_nodes()
        yield ray
    finally:
        ray.shutdown()
        cluster.shutdown()
        if session_cluster:
            init_ray(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})


def _site_of_each_rank(ray, placement, num_ranks: int) -> list[tuple[str, int]]:
    """(node, GPU id) of each rank started with RoleGroup's options: Ray's own view."""
    from engine.ray.role_group import rank_placement_options

    @ray.remote
    def site() -> tuple[str, int]:
        return ray.get_runtime_context().get_node_id(), int(ray.get_gpu_ids()[0])

    return ray.get([site.options(**rank_placement_options(placement, rank)).remote() for rank in range(num_ranks)],
                   timeout=120)


def test_tp_groups_and_colocated_engines_stay_on_one_node(two_gpu_nodes):
    from ray.util.placement_group import placement_group_table

    from engine.ray.colocation import ColocationConfig, make_placements, release_placements
    from engine.ray.vllm_engine import VLLMEngineConfig, _shared_placement_options

    ray = two_gpu_nodes
    # --colocate_all_models: actor, ref and the engines' TP workers share one group.
    placements = make_placements(ColocationConfig(colocate_all_models=True), {"actor": NUM_RANKS, "ref": NUM_RANKS},
                                 engine_workers=NUM_RANKS)
    try:
        placement = placements["actor"]
        assert placements["ref"] is placement and placements["vllm"] is placement  # one rank -> bundle map
        bundle_nodes = placement_group_table(placement.placement_group)["bundles_to_node_id"]
        in_index_order = [bundle_nodes[i] for i in range(NUM_RANKS)]
        # The setup reproduces the problem: bundle i for rank i would split a TP group.
        assert any(len(set(in_index_order[g:g + TP])) > 1 for g in range(0, NUM_RANKS, TP)), in_index_order

        sites = _site_of_each_rank(ray, placement, NUM_RANKS)
        tp_groups = [[node for node, _ in sites[g:g + TP]] for g in range(0, NUM_RANKS, TP)]
        assert all(len(set(group)) == 1 for group in tp_groups), tp_groups
        for node in set(bundle_nodes.values()):  # a node's ranks in its GPUs' order
            gpus = [gpu for where, gpu in sites if where == node]
            assert gpus == sorted(gpus), (node, gpus)

        engines = VLLMEngineConfig(tensor_parallel_size=TP, shared_placement_group=placement.placement_group,
                                   shared_bundle_order=placement.bundle_order)
        for engine in range(NUM_RANKS // TP):
            options = _shared_placement_options(engines, engine)
            bundles = [int(b) for b in options["runtime_env"]["env_vars"]["VLLM_RAY_BUNDLE_INDICES"].split(",")]
            # Engine i's workers sit on the GPUs of actor ranks [i * tp, (i + 1) * tp): one node.
            assert bundles == [placement.bundle_index(rank) for rank in range(engine * TP, (engine + 1) * TP)]
            assert len({bundle_nodes[b] for b in bundles}) == 1, (engine, bundles)
    finally:
        release_placements(placements)
