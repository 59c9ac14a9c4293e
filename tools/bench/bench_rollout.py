"""Rollout throughput of the vLLM engines vs HF ``generate``, and weight-sync cost vs a memory copy.

    python -m tools.bench.bench_rollout            # reference workload W (DESIGN.md)
    python -m tools.bench.bench_rollout --quick    # smaller, for a smoke run

Workload W: a Llama with hidden 512, 8 layers, 8 heads / 4 KV heads, intermediate 1408 and the
local ~500-token tokenizer (~24M parameters, random weights); 64 prompts x 128 new tokens, every
sequence forced to the full length (``min_new_tokens`` / ``ignore_eos``). Baselines measured in
the same run:

* rollout: HF ``generate`` in fp32 (one batch, greedy) vs our ``generate`` over one vLLM engine
  (greedy, log-probs on, as a rollout needs them) in bf16 and fp32; then n_samples_per_prompt=4
  on a quarter of the prompts (same number of sequences, prefix caching on);
* weight sync: ``sync_weights`` into the running fp32 engine (transport + vLLM's load and repack)
  and the gloo transport alone (to a bare receiver process), both against ``Tensor.copy_`` of the
  same tensors into preallocated memory, in seconds per GB.

Engines run one at a time; on a shared box the numbers move with the load (printed).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import torch

from models.tiny import build_tiny_model
from tools.bench.common import drain_weight_buckets

W_CONFIG = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=1408)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 prompts x 32 tokens, 2 sync repeats")
    parser.add_argument("--num_prompts", type=int, default=64)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--generate_max_len", type=int, default=128)
    parser.add_argument("--n_samples_per_prompt", type=int, default=4)
    parser.add_argument("--vllm_sync_bucket_mb", type=int, default=16)
    parser.add_argument("--sync_repeats", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        args.num_prompts, args.prompt_len, args.generate_max_len, args.sync_repeats = 16, 16, 32, 2
    return args


def _prompts(args) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    # ids 5.. avoid the special tokens (pad/bos/eos/chat markers)
    return torch.randint(5, 500, (args.num_prompts, args.prompt_len), generator=generator).tolist()


# ---------------------------------------------------------------------------------------------
# Rollout throughput.


def bench_hf(path: str, prompts: list[list[int]], new_tokens: int) -> float:
    """Tokens/s of HF ``generate`` (fp32, greedy, one batch of equal-length prompts)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids[:2], max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        seconds = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return ids.shape[0] * new_tokens / seconds


def _timed_generate(engines, prompts, sampling) -> float:
    from engine.ray.vllm_engine import generate

    generate(engines, prompts[:2], sampling)  # warm-up
    start = time.perf_counter()
    samples = generate(engines, prompts, sampling)
    seconds = time.perf_counter() - start
    assert all(len(s.response_token_ids) == sampling.max_new_tokens for s in samples)
    return sum(len(s.response_token_ids) for s in samples) / seconds


def _engine_config(path: str, dtype: str, args):
    from engine.ray.vllm_engine import VLLMEngineConfig

    return VLLMEngineConfig(pretrain=path, dtype=dtype, enforce_eager=True, enable_prefix_caching=True,
                            max_model_len=args.prompt_len + args.generate_max_len + 16, seed=0)


def _rollout_samplings(args):
    from engine.ray.vllm_engine import SamplingConfig

    fixed = dict(max_new_tokens=args.generate_max_len, min_new_tokens=args.generate_max_len, ignore_eos=True)
    greedy = SamplingConfig(temperature=0.0, **fixed)
    grouped = SamplingConfig(temperature=1.0, n_samples_per_prompt=args.n_samples_per_prompt, seed=0, **fixed)
    return greedy, grouped


# ---------------------------------------------------------------------------------------------
# Weight sync.


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def memcpy_seconds(tensors: dict[str, torch.Tensor], repeats: int) -> float:
    """The floor: ``copy_`` of every tensor into preallocated memory (median of ``repeats``)."""
    targets = {name: torch.empty_like(t) for name, t in tensors.items()}
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def transport_seconds(tensors: dict[str, torch.Tensor], bucket_bytes: int, repeats: int) -> float:
    """gloo transport alone, sender -> one receiver process (median of ``repeats``)."""
    from parallel.weight_transfer import iter_buckets, make_transport

    transport = make_transport("gloo", world_size=2, host="127.0.0.1", timeout_s=300)
    receiver = mp.get_context("spawn").Process(target=drain_weight_buckets, args=(transport.receiver_spec(), repeats + 1))
    receiver.start()
    transport.connect()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for bucket in iter_buckets(tensors.items(), bucket_bytes):
            transport.send_bucket(bucket)
        transport.send_end(aborted=False, num_tensors=len(tensors))
        transport.channel.barrier()
        times.append(time.perf_counter() - start)
    receiver.join(timeout=60)
    transport.close()
    return statistics.median(times[1:])


def sync_seconds(engines, tensors: dict[str, torch.Tensor], bucket_bytes: int,
                 repeats: int) -> tuple[float, float, int]:
    """``sync_weights`` into running engines, transport reused: median seconds of ``repeats``, the
    median of the workers' time inside vLLM's loader, and the number of buckets."""
    from engine.ray.weight_sync import connect_transport, sync_weights

    transport = connect_transport(engines, backend="gloo")
    times, load_times, buckets = [], [], 0
    for _ in range(repeats + 1):
        start = time.perf_counter()
        stats = sync_weights(engines, iter(tensors.items()), bucket_bytes=bucket_bytes, transport=transport)
        times.append(time.perf_counter() - start)
        load_times.append(stats.worker_load_seconds)
        buckets = stats.num_buckets
    transport.close()
    return statistics.median(times[1:]), statistics.median(load_times[1:]), buckets


# ---------------------------------------------------------------------------------------------


def _with_engine(path: str, dtype: str, args, work):
    from engine.ray.vllm_engine import create_engines, shutdown_engines

    engines = create_engines(_engine_config(path, dtype, args))
    try:
        return work(engines)
    finally:
        shutdown_engines(engines)


def main() -> None:
    import ray

    args = _parse_args()
    print(f"load average before: {os.getloadavg()}; torch threads {torch.get_num_threads()}", flush=True)
    workdir = tempfile.mkdtemp(prefix="bench_rollout_")
    path = build_tiny_model("llama", os.path.join(workdir, "w"), seed=0, **W_CONFIG)
    prompts = _prompts(args)
    tokens = args.num_prompts * args.generate_max_len
    print(f"workload: {args.num_prompts} prompts x {args.prompt_len} tokens -> {args.generate_max_len} new tokens "
          f"({tokens} tokens)", flush=True)

    hf_tps = bench_hf(path, prompts, args.generate_max_len)
    print(f"HF generate fp32              : {hf_tps:8.0f} tokens/s  ({tokens / hf_tps:.2f} s)", flush=True)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    greedy, grouped = _rollout_samplings(args)
    grouped_prompts = prompts[: max(1, args.num_prompts // args.n_samples_per_prompt)]
    bf16_tps = _with_engine(path, "bfloat16", args, lambda e: _timed_generate(e, prompts, greedy))
    print(f"vLLM bf16                     : {bf16_tps:8.0f} tokens/s  ({bf16_tps / hf_tps:.2f}x HF)", flush=True)

    tensors = _load_tensors(path)
    gigabytes = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9
    bucket_bytes = args.vllm_sync_bucket_mb << 20

    def fp32_work(engines):
        tps = _timed_generate(engines, prompts, greedy)
        group_tps = _timed_generate(engines, grouped_prompts, grouped)
        return tps, group_tps, sync_seconds(engines, tensors, bucket_bytes, args.sync_repeats)

    fp32_tps, group_tps, (sync_s, load_s, buckets) = _with_engine(path, "float32", args, fp32_work)
    print(f"vLLM fp32                     : {fp32_tps:8.0f} tokens/s  ({fp32_tps / hf_tps:.2f}x HF)")
    print(f"vLLM fp32, {len(grouped_prompts)} prompts x n={args.n_samples_per_prompt} : {group_tps:8.0f} tokens/s  "
          f"({group_tps / fp32_tps:.2f}x the {args.num_prompts} distinct prompts; prefix caching on)", flush=True)
    ray.shutdown()

    copy_s = memcpy_seconds(tensors, args.sync_repeats)
    wire_s = transport_seconds(tensors, bucket_bytes, args.sync_repeats)
    print(f"weight sync of {gigabytes * 1e3:.0f} MB fp32 ({len(tensors)} tensors, {buckets} buckets of "
          f"<= {args.vllm_sync_bucket_mb} MB):")
    print(f"  memcpy floor (Tensor.copy_) : {copy_s / gigabytes:8.3f} s/GB")
    print(f"  gloo transport only         : {wire_s / gigabytes:8.3f} s/GB  ({wire_s / copy_s:.1f}x memcpy)")
    print(f"  sync_weights into vLLM      : {sync_s / gigabytes:8.3f} s/GB  ({sync_s / copy_s:.1f}x memcpy; "
          f"{sync_s:.3f} s per sync, {load_s:.3f} s of it in vLLM's loader)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
