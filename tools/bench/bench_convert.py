"""HF -> Megatron -> HF conversion throughput against reading the same safetensors (the floor).

    python -m tools.bench.bench_convert [--quick] [--tensor_model_parallel_size 2]

Times, on workload W's model (DESIGN.md): (a) reading every tensor of the HF checkpoint with
safetensors (the disk/memory floor), (b) ``hf_to_mcore`` loading the HF checkpoint slice-wise
into a running Megatron model and saving the sharded checkpoint, (c) ``mcore_to_hf`` loading it
and streaming the HF export. Reports GB/s of each and the ratio to the floor. Process start-up
is excluded (timed inside the ranks).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from tools.bench.common import print_table, reference_model


def read_floor(path: str) -> tuple[float, int]:
    from models.hf_checkpoint import HFCheckpointReader

    reader = HFCheckpointReader(path)
    total = 0
    start = time.perf_counter()
    for name in reader.keys():
        tensor = reader.read(name).clone()  # touch every byte: mmap reads are lazy
        total += tensor.numel() * tensor.element_size()
    elapsed = time.perf_counter() - start
    reader.close()
    return elapsed, total


def _to_mcore(hf_path, save_path, tp, result_file):
    import torch.distributed as dist

    from models.builder import build_model
    from models.mcore_checkpoint import save_model
    from models.registry import load_adapter
    from models.weights import load_hf_weights
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    config = ParallelConfig(tensor_model_parallel_size=tp)
    adapter = load_adapter(hf_path)
    initialize_parallel(config)
    model = build_model(adapter, config)
    dist.barrier()
    start = time.perf_counter()
    load_hf_weights(model, adapter, hf_path)
    loaded = time.perf_counter()
    save_model(model, save_path, adapter=adapter, hf_source_dir=hf_path)
    if dist.get_rank() == 0:
        torch.save((loaded - start, time.perf_counter() - loaded), result_file)


def _to_hf(load_path, save_path, tp, result_file):
    import torch.distributed as dist

    from models.builder import ModelBuildConfig, build_model
    from models.mcore_checkpoint import HF_DIR, load_model, read_meta
    from models.registry import load_adapter
    from models.weights import save_hf_checkpoint
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    config = ParallelConfig(tensor_model_parallel_size=tp)
    adapter = load_adapter(f"{load_path}/{HF_DIR}")
    initialize_parallel(config)
    model = build_model(adapter, config, ModelBuildConfig(padded_vocab_size=read_meta(load_path)["padded_vocab_size"]))
    dist.barrier()
    start = time.perf_counter()
    load_model(model, load_path)
    loaded = time.perf_counter()
    save_hf_checkpoint(model, adapter, save_path, source_dir=f"{load_path}/{HF_DIR}")
    if dist.get_rank() == 0:
        torch.save((loaded - start, time.perf_counter() - loaded), result_file)


def timed_on_ranks(fn, world_size: int, *args) -> tuple[float, float]:
    from parallel.launch import spawn_local_ranks

    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "seconds.pt")
        spawn_local_ranks(fn, world_size, *args, result)
        return torch.load(result)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tensor_model_parallel_size", type=int, default=1)
    args = parser.parse_args(argv)
    tp = args.tensor_model_parallel_size
    with tempfile.TemporaryDirectory() as tmp:
        hf = reference_model(tmp, quick=args.quick)
        floor_s, nbytes = read_floor(hf)
        to_mcore_s = timed_on_ranks(_to_mcore, tp, hf, f"{tmp}/mcore", tp)
        to_hf_s = timed_on_ranks(_to_hf, tp, f"{tmp}/mcore", f"{tmp}/hf_out", tp)
    gb = nbytes / 1e9
    rows = [("read safetensors (floor)", gb / floor_s, 1.0)]
    for label, seconds in (
        (f"HF -> running Megatron model, TP={tp} (slice-wise load)", to_mcore_s[0]),
        ("running model -> sharded Megatron checkpoint", to_mcore_s[1]),
        (f"sharded checkpoint -> running model, TP={tp}", to_hf_s[0]),
        ("running model -> HF safetensors (streamed export)", to_hf_s[1]),
    ):
        rows.append((label, gb / seconds, floor_s / seconds))
    print_table(f"conversion throughput, {nbytes / 1e6:.0f} MB of weights", ["step", "GB/s", "ratio vs floor"], rows)


if __name__ == "__main__":
    main()
