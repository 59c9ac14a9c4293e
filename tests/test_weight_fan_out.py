"""Every rank of a TP x PP actor ends up holding every HF tensor of the model (``StageFanOut``).

This is the half of the colocated CUDA IPC sync (``--colocate_all_models``) that does not need a
GPU: an engine worker can map only a bucket on its own GPU, so every actor rank must hold each
bucket. The ranks of a stage build its buckets themselves (``iter_hf_weights(every_rank=True)``)
and the stage's first rank sends them to the other stages' ranks. Here over gloo on CPU tensors;
on GPU the same groups carry NCCL and each rank then offers a CUDA IPC handle of its copy.
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed

SMALL_BUCKET_BYTES = 20_000  # many buckets per stage


def _every_bucket_on_every_rank(rank, world_size, path, tp, pp):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from models.builder import build_model
    from models.registry import load_adapter
    from models.weights import iter_hf_weights, load_hf_weights
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel
    from parallel.weight_transfer import StageFanOut, unpack_bucket

    initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    adapter = load_adapter(path)
    model = build_model(adapter, ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    load_hf_weights(model, adapter, path)
    stages = [None] * world_size
    dist.all_gather_object(stages, ps.get_pipeline_model_parallel_rank())
    fan_out = StageFanOut(stages, rank=rank, device=torch.device("cpu"), timeout_s=120)
    received, buckets = {}, 0
    for entries, buffer in fan_out.buckets(iter_hf_weights(model, adapter, every_rank=True), SMALL_BUCKET_BYTES):
        buckets += 1
        for name, tensor in unpack_bucket(entries, buffer):
            assert name not in received, f"{name} arrived twice"
            received[name] = tensor.clone()
    return received, buckets


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)], ids=["pp2", "tp2_pp2"])
def test_every_rank_holds_every_tensor_after_the_fan_out(tiny_models, tp, pp):
    from safetensors.torch import load_file

    path = tiny_models["llama"]
    expected = load_file(f"{path}/model.safetensors")
    results = run_distributed(_every_bucket_on_every_rank, tp * pp, args=(path, tp, pp), timeout=300)
    for rank, (received, buckets) in enumerate(results):
        assert sorted(received) == sorted(expected), f"rank {rank}"
        for name, tensor in expected.items():
            torch.testing.assert_close(received[name], tensor, atol=0, rtol=0, msg=f"rank {rank}: {name}")
        assert buckets > 2 * pp  # several buckets per stage: the stage-after-stage order is exercised
