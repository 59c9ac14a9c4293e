"""Rank -> bundle placement across nodes: a TP group (consecutive ranks) must stay on one node.

Ray's PACK strategy does not keep a node's bundles contiguous: past 16 equal bundles its sort
reorders them (bundle 0 on one node, the next few on the other, the rest back on the first), so
"rank i in bundle i" splits TP groups over nodes. Two logical nodes of a ``ray.cluster_utils``
cluster declare GPUs they do not have (Ray counts GPUs as a logical resource), so the GPU path of
``make_placement`` runs; light tasks stand in for the Megatron ranks and report their node.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from engine.ray.colocation import bundles_by_node

REPO = Path(__file__).resolve().parents[1]
GPUS_PER_NODE = 20
NUM_RANKS = 32  # over 16 bundles, not filling the nodes: Ray then interleaves them (seen: 0 | 1-12 | 13-31)
TP = 4  # divides both nodes' shares (20 and 12)


def test_bundles_by_node_groups_each_nodes_bundles_in_first_seen_order():
    nodes = {0: "a", 1: "b", 2: "b", 3: "a", 4: "c", 5: "a"}
    assert bundles_by_node(nodes) == (0, 3, 5, 1, 2, 4)
    assert bundles_by_node({1: "x", 0: "y"}) == (0, 1)  # by index, not by dict order
    assert bundles_by_node({i: "one" for i in range(4)}) == (0, 1, 2, 3)  # one node: unchanged


def test_colocated_engines_take_their_bundles_in_the_roles_order():
    """--colocate_all_models: engine i's TP workers go where actor ranks [i * tp, (i + 1) * tp) are."""
    from engine.ray.vllm_engine import VLLMEngineConfig, _shared_placement_options

    config = VLLMEngineConfig(num_engines=2, tensor_parallel_size=2, shared_placement_group=object(),
                              shared_bundle_order=(0, 3, 1, 2), gpu_fraction=0.5)
    options = [_shared_placement_options(config, engine) for engine in range(2)]
    assert [o["runtime_env"]["env_vars"]["VLLM_RAY_BUNDLE_INDICES"] for o in options] == ["0,3", "1,2"]
    assert [o["scheduling_strategy"].placement_group_bundle_index for o in options] == [0, 1]


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
        shutil.rmtree(root, ignore_errors=True)
        if session_cluster:
            ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})


def _node_of_each_rank(ray, placement, num_ranks: int) -> list[str]:
    """Where each rank runs when started with RoleGroup's options (Ray's own view)."""
    from engine.ray.role_group import rank_placement_options

    @ray.remote
    def node_id() -> str:
        return ray.get_runtime_context().get_node_id()

    # One at a time: the tasks then reuse a worker process or two instead of starting one per rank.
    return [ray.get(node_id.options(**rank_placement_options(placement, rank)).remote(), timeout=60)
            for rank in range(num_ranks)]


def test_tp_groups_of_a_packed_group_stay_on_one_node(two_gpu_nodes):
    from ray.util.placement_group import placement_group_table

    from engine.ray.colocation import gpus_available, make_placement, release_placements

    ray = two_gpu_nodes
    assert gpus_available()
    placement = make_placement(NUM_RANKS, num_roles_sharing=2)  # e.g. actor and ref colocated
    try:
        bundle_nodes = placement_group_table(placement.placement_group)["bundles_to_node_id"]
        in_index_order = [bundle_nodes[i] for i in range(NUM_RANKS)]
        # The setup reproduces the problem: bundle i for rank i would split a TP group.
        assert any(len(set(in_index_order[g:g + TP])) > 1 for g in range(0, NUM_RANKS, TP)), in_index_order
        nodes = _node_of_each_rank(ray, placement, NUM_RANKS)
        tp_groups = [nodes[g:g + TP] for g in range(0, NUM_RANKS, TP)]
        assert all(len(set(group)) == 1 for group in tp_groups), tp_groups
        assert sorted(placement.bundle_order) == list(range(NUM_RANKS))  # every bundle used once
    finally:
        release_placements({"actor": placement})
