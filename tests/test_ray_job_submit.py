"""``ray job submit`` of train_ppo_ray to a real two-node Ray cluster (head + worker node on this
host): actor and engine on different nodes, the run equal to the same run on a local Ray."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.launchers.ray_cluster import LocalRayCluster

pytestmark = pytest.mark.slow

REWARD_FUNC = '''
def reward_func(prompts, responses, labels):
    return [1.0 if r.strip().startswith("1") else 0.0 for r in responses]
'''


@pytest.fixture(scope="module")
def cluster():
    started = LocalRayCluster(num_nodes=2, cpus_per_node=1).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def grpo_setup(tmp_path_factory):
    from engine.cli import demo

    root = tmp_path_factory.mktemp("ray_job")
    model, data = demo.prepare(root)
    reward = root / "starts_with_one.py"
    reward.write_text(REWARD_FUNC)
    return {"model": model, "prompts": f"json@{data}", "reward": str(reward), "root": root}


def _grpo_args(setup, tensorboard_dir) -> list[str]:
    return ["--pretrain", setup["model"], "--prompt_data", setup["prompts"], "--input_key", "prompt",
            "--label_key", "label", "--remote_rm_url", setup["reward"], "--advantage_estimator", "grpo",
            "--init_kl_coef", "0", "--max_steps", "2", "--n_samples_per_prompt", "4", "--rollout_batch_size", "4",
            "--train_batch_size", "16", "--micro_train_batch_size", "8", "--micro_rollout_batch_size", "16",
            "--generate_max_len", "6", "--learning_rate", "1e-3", "--lr_warmup_ratio", "0",
            "--enforce_eager", "--vllm_dtype", "float32", "--seed", "7",
            "--use_tensorboard", str(tensorboard_dir)]


def _metrics(tensorboard_dir) -> dict[str, list[float]]:
    """Every logged scalar but timings (``time/*``, ``*_seconds``), by name."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if "time/" not in tag and not tag.endswith("seconds")}


def _check(result) -> None:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"


def test_submitted_run_spans_two_nodes_and_equals_the_local_run(ray_cluster, cluster, grpo_setup, monkeypatch):
    from engine.cli import train_ppo_ray

    root = grpo_setup["root"]
    # The local run: the CLI's main on this worker's local Ray instance (the session's; a driver
    # joins the one it is in), with no cluster address in sight.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    train_ppo_ray.main(_grpo_args(grpo_setup, root / "tb_local"))

    # As users submit it: the code travels as the job's working_dir (.gitignore'd paths stay behind).
    runtime_env = json.dumps({"working_dir": str(REPO)})
    submitted = cluster.submit(["python", "-m", "engine.cli.train_ppo_ray", *_grpo_args(grpo_setup, root / "tb_job")],
                               runtime_env_json=runtime_env)
    _check(submitted)

    placement = re.search(r"^placement: .*$", submitted.stdout, re.M)
    assert placement, submitted.stdout[-4000:]
    nodes = dict(re.findall(r"(actor rank 0|engine 0) on node (\d+)", placement.group(0)))
    assert nodes["actor rank 0"] != nodes["engine 0"], placement.group(0)

    expected, actual = _metrics(root / "tb_local"), _metrics(root / "tb_job")
    assert "train/reward" in expected and len(expected["train/reward"]) == 2, sorted(expected)
    assert actual == expected


def test_unreachable_ray_address_fails_fast_naming_it(grpo_setup, tmp_path):
    from parallel.ports import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "engine.cli.train_ppo_ray", *_grpo_args(grpo_setup, tmp_path)],
                            cwd=REPO, env={**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"RAY_ADDRESS={address}: no Ray cluster answers there" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60


def test_dashboard_address_as_ray_address_is_explained():
    from engine.ray.cluster import check_address
    from parallel.launch import LaunchError

    with pytest.raises(LaunchError, match="is a dashboard address"):
        check_address("http://127.0.0.1:8265")
    check_address(None)
    check_address("auto")


def test_processes_that_reserve_nothing_are_dealt_over_the_nodes_in_turn():
    from engine.ray.colocation import NodeDealer, Placement

    dealer = NodeDealer(["driver-node", "other-node"])
    actor = dealer.pin(Placement(), 1)
    assert actor.node_ids == ("driver-node",)
    colocated = Placement(placement_group=object())
    assert dealer.pin(colocated, 2) is colocated  # a placement group decides by itself
    assert dealer.deal(3) == ("other-node", "driver-node", "other-node")
    assert NodeDealer([]).deal(2) == ()  # one node, or GPUs: Ray's resources decide


def test_a_local_ray_start_that_timed_out_is_retried_and_other_errors_raise(monkeypatch):
    """Ray 2.x gives a new raylet 30 s to register; a loaded machine can miss it (seen in CI): the
    start is tried again (after a shutdown of the half-started instance), up to STARTUP_ATTEMPTS."""
    import ray

    from engine.ray import cluster

    calls, shutdowns = [], []

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) < cluster.STARTUP_ATTEMPTS:
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    cluster.init_ray(address="local", num_cpus=2)
    assert len(calls) == cluster.STARTUP_ATTEMPTS and len(shutdowns) == cluster.STARTUP_ATTEMPTS - 1
    calls.clear()

    def refused(**kwargs):
        calls.append(kwargs)
        raise ValueError("bad address")

    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(ValueError, match="bad address"):
        cluster.init_ray(address="local")
    assert len(calls) == 1  # not a start-up time-out: no retry
