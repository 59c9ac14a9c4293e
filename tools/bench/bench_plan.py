"""The capacity planner's predictions against measured SFT steps on this machine, per component.

    python -m tools.bench.bench_plan [--quick]

A small Llama (hidden 256, 4 layers; --quick: 2 layers) trains at TP / PP / CP / DP of 1-2 and with
recompute. Memory: measured bytes per rank (weights, gradient buffer, optimizer state, peak saved
activations: tools/plan/measure.py) over the planner's prediction. Time: the measured step over the
planner's estimate for a "cluster" of this machine, whose peak FLOP/s and link bandwidth are
measured in the same run (an fp32 GEMM per rank's threads, a memory copy) and an MFU of 1, so the
ratio shows what the planner's model leaves out on CPU (non-GEMM work, gloo overheads).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from tools.bench.common import print_table

SEQ, MICRO, MICROBATCHES = 256, 2, 4
CONFIGS = {
    "TP1": (1, {}, {}),
    "TP1 full recompute": (1, {}, {"recompute_granularity": "full"}),
    "TP2 SP": (2, {"tensor_model_parallel_size": 2, "sequence_parallel": True}, {}),
    "PP2": (2, {"pipeline_model_parallel_size": 2}, {}),
    "CP2": (2, {"context_parallel_size": 2}, {}),
    "DP2": (2, {}, {}),
}


def _gemm_tflops(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        a @ b
    return 2 * 1024**3 * repeats / (time.perf_counter() - start) / 1e12


def _copy_gbps() -> float:
    source = torch.empty(256 << 20, dtype=torch.uint8)
    target = torch.empty_like(source)
    start, repeats = time.perf_counter(), 5
    for _ in range(repeats):
        target.copy_(source)
    return source.numel() * repeats / (time.perf_counter() - start) / 1e9


def _worker(path, layout, build, result_file):
    import torch.distributed as dist

    from tools.plan.measure import measure_sft_steps

    measured = measure_sft_steps(path, layout, build, micro_batch=MICRO, seq_len=SEQ, num_microbatches=MICROBATCHES,
                                 timed_steps=2)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, measured)
    if dist.get_rank() == 0:
        torch.save(gathered, result_file)


def _measure(path: str, world: int, layout: dict, build: dict) -> list[dict]:
    from parallel.launch import spawn_local_ranks

    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.pt")
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
        spawn_local_ranks(_worker, world, path, layout, build, result_file)
        return torch.load(result_file)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers instead of 4")
    args = parser.parse_args(argv)
    from models.tiny import build_tiny_model
    from tools.plan.measure import predict_sft_step
    from tools.plan.timing import Cluster

    cores = os.cpu_count() or 1
    copy = _copy_gbps()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_tiny_model("llama", f"{tmp}/small", hidden_size=256, intermediate_size=512,
                                    num_attention_heads=8, num_key_value_heads=4,
                                    num_hidden_layers=2 if args.quick else 4))
        for name, (world, layout, build) in CONFIGS.items():
            measured = _measure(path, world, layout, build)
            tflops = _gemm_tflops(max(1, cores // world))
            cluster = Cluster(nodes=1, gpus_per_node=world, gpu_memory_gb=0, gpu_tflops=tflops, mfu=1.0,
                              intra_node_gbps=copy, inter_node_gbps=copy, hbm_gbps=copy)
            predicted = predict_sft_step(path, layout, build, micro_batch=MICRO, seq_len=SEQ,
                                         num_microbatches=MICROBATCHES, dp=measured[0]["dp"], cluster=cluster)
            for rank, m in enumerate(measured):
                p = predicted[m["stage"]]
                ratios = [m[k] / p[k] if p[k] else float("nan") for k in ("weights", "grads", "optimizer", "activations")]
                step = sum(p["seconds"].values())
                rows.append((name, rank, *ratios, tflops, m["seconds"], step, m["seconds"] / step))
    print_table(f"measured / predicted per rank (memory copy {copy:.3g} GB/s as the link bandwidth)",
                ["layout", "rank", "weights", "grads", "optimizer", "activations", "GEMM TFLOP/s", "step s",
                 "predicted s", "ratio"], rows)


if __name__ == "__main__":
    main()
