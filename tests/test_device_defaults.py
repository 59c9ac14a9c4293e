"""What the code picks when CUDA is present, decided on a CPU box (the GPU check runs the picks)."""
from __future__ import annotations

import multiprocessing.forkserver
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from parallel.initialize import default_backend
from parallel.launch import PRELOAD_MODULES, rank_process_context, rank_start_method
from tools.gpu_check import peak_flops, train_flops_per_token


def test_cuda_backend_serves_cpu_tensors_too():
    # A bare "nccl" has no CPU backend: the first CPU metric in an all_reduce fails on GPU.
    assert default_backend(cuda=True) == "cpu:gloo,cuda:nccl"
    assert default_backend(cuda=False) == "gloo"


def test_device_keyed_backend_reduces_cpu_tensors(tmp_path):
    # The "device:backend" form on this build: CPU tensors go to the backend named for "cpu".
    dist.init_process_group("cpu:gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        value = torch.tensor([2.0])
        dist.all_reduce(value)
        assert value.item() == 2.0
    finally:
        dist.destroy_process_group()


def test_ranks_are_spawned_when_cuda_is_present():
    # The forkserver preloads megatron (and Transformer Engine through it): forking after a CUDA
    # initialisation breaks the ranks, so CUDA means spawn.
    assert rank_start_method(cuda=True) == "spawn"
    assert rank_start_method(cuda=False) == "forkserver"
    assert rank_process_context(cuda=True).get_start_method() == "spawn"
    assert rank_process_context(cuda=False).get_start_method() == "forkserver"
    assert multiprocessing.forkserver._forkserver._preload_modules == list(PRELOAD_MODULES)


def test_gpu_check_train_step_runs_its_code_on_cpu(tmp_path):
    # scripts/gpu_check.sh is first run on a lent GPU: its own code is proven here, on a small
    # model, so that a GPU minute is never spent on a typo. The check asserts that the loss falls.
    done = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--child", "train_step", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1].startswith("PASS train_step:"), done.stdout


def test_mfu_counts_dense_and_attention_flops():
    assert train_flops_per_token(params=10, num_layers=2, hidden=4, seq_len=8) == 6 * 10 + 6 * 2 * 4 * 8
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("Tesla T4") is None


def test_precision_follows_the_hardware_unless_a_flag_says():
    from engine.cli.options import parse_job
    from engine.cli.train_sft import SFTJob
    from models.builder import ModelBuildConfig, resolve_bf16

    assert resolve_bf16(None, cuda=True) and not resolve_bf16(None, cuda=False)
    assert not resolve_bf16(False, cuda=True) and resolve_bf16(True, cuda=False)
    assert ModelBuildConfig().params_dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    base = ["--pretrain", "m", "--dataset", "d"]
    builds = {flag: parse_job(SFTJob, base + ([flag] if flag else [])).trainer.engine.build.bf16
              for flag in ("", "--bf16", "--fp32")}
    assert builds == {"": None, "--bf16": True, "--fp32": False}


def test_ray_rank_takes_its_assigned_gpu_under_each_ray_env():
    from engine.ray.devices import DeviceError, ray_device_index

    def index(gpu_ids, env=None, count=1, cluster=True):
        return ray_device_index(gpu_ids=gpu_ids, env=env or {}, device_count=count, cluster_has_gpus=cluster,
                                who="actor rank 3")

    # Ray narrowed CUDA_VISIBLE_DEVICES to the one assigned GPU.
    assert index(["5"], {"CUDA_VISIBLE_DEVICES": "5"}) == 0
    noset = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
    # Every GPU stays visible: the assigned one, not cuda:0 for every rank.
    assert index(["5"], noset, count=8) == 5
    assert index([6], {**noset, "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, count=4) == 2
    with pytest.raises(DeviceError, match="not in CUDA_VISIBLE_DEVICES"):
        index(["1"], {**noset, "CUDA_VISIBLE_DEVICES": "4,5"}, count=2)
    # A CPU-only cluster trains on the CPU; a GPU cluster that gave this rank no GPU is an error.
    assert index([], count=0, cluster=False) is None
    with pytest.raises(DeviceError, match=r"actor rank 3 was given no GPU.*--<role>_num_gpus_per_node"):
        index([], count=0, cluster=True)
    with pytest.raises(DeviceError, match=r"actor rank 3: Ray assigned GPU 2 but torch sees no CUDA device"):
        index(["2"], {"CUDA_VISIBLE_DEVICES": "2"}, count=0)  # e.g. a CPU build of torch on a GPU node


def test_engines_start_before_the_roles_only_when_they_share_the_gpus():
    from engine.cli.train_ppo_ray import engines_first
    from engine.ray.colocation import Placement

    shared = Placement(placement_group=object(), gpu_per_rank=0.5)
    # --colocate_all_models on GPU: make_placements gives the engines ("vllm") the roles' group.
    assert engines_first({"actor": shared, "ref": shared, "vllm": shared})
    assert not engines_first({"actor": Placement(), "ref": Placement()})


def test_weight_sync_backend_follows_where_the_engines_run():
    from engine.ray.weight_sync import WeightSyncConfig, resolve_sync_backend

    assert WeightSyncConfig().backend == "auto"
    assert resolve_sync_backend("auto", cuda=False, colocated=False) == "gloo"
    assert resolve_sync_backend("auto", cuda=True, colocated=False) == "nccl"  # never GPU -> host -> TCP by default
    # NCCL refuses two ranks on one GPU ("Duplicate GPU detected"): colocated engines map the actor's memory.
    assert resolve_sync_backend("auto", cuda=True, colocated=True) == "cuda_ipc"
    assert resolve_sync_backend("gloo", cuda=True, colocated=True) == "gloo"  # asked for: slow, but it works
    with pytest.raises(ValueError, match="--vllm_sync_backend nccl cannot reach engines on the actor's own GPUs"):
        resolve_sync_backend("nccl", cuda=True, colocated=True)
    with pytest.raises(ValueError, match="--vllm_sync_backend cuda_ipc needs the engines on the actor's GPUs"):
        resolve_sync_backend("cuda_ipc", cuda=True, colocated=False)
    with pytest.raises(ValueError, match="--vllm_sync_backend nccl needs GPU engines"):
        resolve_sync_backend("nccl", cuda=False, colocated=False)


def test_colocated_rollout_hands_the_gpu_over_in_stages(monkeypatch):
    """--colocate_all_models --vllm_enable_sleep --megatron_enable_sleep: who holds the GPU when.
    The engines and role groups are recorders here (the real ones need a GPU for sleep mode; the
    parking itself is proven in tests/test_training_offload.py and in the PP=2 GAE run)."""
    from engine.ray.rollouts import EngineRollouts, TrainerSleep
    from engine.rl.rollout import SamplingConfig

    calls = []

    class Pool:  # records the EnginePool calls
        def wake_up(self, tags=None):
            calls.append(("wake", *tags))

        def sleep(self):
            calls.append(("sleep",))

        def submit_generate(self, prompts, sampling):
            calls.append(("generate",))

    class Role:
        def __init__(self, name):
            self.name = name

        def park_training_state(self, parts):
            calls.append((self.name, "park", *parts))
            return {part: 1 << 30 for part in parts}

        def restore_training_state(self):
            calls.append((self.name, "restore"))
            return {"weights": 1 << 30}

    class Sync:
        def push(self):
            calls.append(("push",))
            return {"sync/bytes": 1.0}

    rollouts_ = EngineRollouts(Pool(), Sync(), sleep=True, asleep=True, trainers=TrainerSleep(Role("actor"), Role("critic")))
    rollouts_.generate_async([[1, 2]], SamplingConfig())
    rollouts_.release_memory()
    metrics = rollouts_.sync_weights()
    assert calls == [
        ("wake", "weights"),  # asleep since start-up with weights of their own
        ("actor", "park", "weights", "grads", "optimizer"), ("critic", "park", "weights", "grads", "optimizer"),
        ("wake", "kv_cache"), ("generate",),
        ("sleep",), ("actor", "restore"), ("critic", "restore"),  # score and train
        ("actor", "park", "grads", "optimizer"), ("critic", "park", "weights", "grads", "optimizer"),
        ("wake", "weights"), ("push",),  # the actor's weights are still on its GPU to be sent
    ]
    assert metrics["memory/actor_parked_gb"] == 5.0 and metrics["memory/critic_restored_gb"] == 1.0
    calls.clear()
    rollouts_.generate_async([[1, 2]], SamplingConfig())  # the engines' weights are awake: only the cache wakes
    assert calls == [("actor", "park", "weights", "grads", "optimizer"),
                     ("critic", "park", "weights", "grads", "optimizer"), ("wake", "kv_cache"), ("generate",)]


def test_trainers_sleep_where_the_engines_share_their_gpus_unless_told():
    from engine.ray.colocation import ColocationConfig

    assert ColocationConfig().trainers_sleep(engines_share_gpus=True)
    assert not ColocationConfig().trainers_sleep(engines_share_gpus=False)
    assert ColocationConfig(megatron_enable_sleep=True).trainers_sleep(engines_share_gpus=False)
    assert not ColocationConfig(megatron_enable_sleep=False).trainers_sleep(engines_share_gpus=True)


def test_rank_processes_start_without_megatron_import_warnings():
    """megatron-core warns at import that Apex / TE are absent (4-5 lines per rank above the demo's
    first line); the forkserver imports ``parallel`` first, whose filters silence exactly those."""
    code = ("from parallel.launch import rank_process_context\n"
            "if __name__ == '__main__':\n"
            "    context = rank_process_context(cuda=False)\n"
            "    process = context.Process(target=print, args=('rank ran',))\n"
            "    process.start(); process.join()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank ran" in done.stdout
    assert "not installed" not in done.stderr, done.stderr
