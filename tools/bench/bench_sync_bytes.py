"""Weight-sync bytes and time of an MLA model (DeepSeek-V3) vs a same-size GQA model (Llama).

    python -m tools.bench.bench_sync_bytes            # W's size: hidden 512, 8 layers, 8 heads
    python -m tools.bench.bench_sync_bytes --quick    # hidden 128, 2 layers, 4 heads

Both models are dense (DeepSeek-V3 with ``first_k_dense_replace`` = all layers) with W's MLP,
vocabulary and embeddings, so they differ only in attention: Llama's GQA (8 heads / 4 KV heads
of 64) against MLA with W's head count, 64 plain + 32 rotary q/k dims, v 64, q and kv ranks of
hidden / 4 (the shapes of ``tools.bench.common.FRONTIER_SHAPE``). Each model is loaded into the
Megatron training engine (one rank, fp32 on CPU); what a sync sends is what the actor's sender
sends (``models.weights.iter_hf_weights`` in the adapter's export dtype, as
``engine.ray.weight_senders.OwnerSender``): its bytes, those of the attention tensors, and the
median seconds of the export alone and of the export streamed through
``parallel.weight_transfer.stream_weights`` (the gloo buckets) to one receiver process that loads
nothing (no vLLM engine: the loader's time is not in it).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time

import torch

from tools.bench.common import drain_weight_buckets, print_table, reference_model, run_on_local_ranks


def _sync_worker(path, bucket_bytes, repeats, result_file):
    from engine.runtime.engine import EngineConfig, TrainingEngine
    from models.weights import iter_hf_weights
    from parallel.config import ParallelConfig
    from parallel.weight_transfer import make_transport, stream_weights

    engine = TrainingEngine(EngineConfig(pretrain=path, parallel=ParallelConfig()), total_steps=1)
    model, adapter = engine.model, engine.adapter

    def tensors():
        return iter_hf_weights(model, adapter, dtype=adapter.export_dtype())

    total = attention = count = 0
    for name, tensor in tensors():
        nbytes = tensor.numel() * tensor.element_size()
        total += nbytes
        attention += nbytes if ".self_attn." in name else 0
        count += 1
    export_times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for _ in tensors():
            pass
        export_times.append(time.perf_counter() - start)

    transport = make_transport("gloo", world_size=2, host="127.0.0.1", timeout_s=300)
    receiver = mp.get_context("spawn").Process(target=drain_weight_buckets, args=(transport.receiver_spec(), repeats + 1))
    receiver.start()
    transport.connect()
    sync_times, buckets = [], 0
    for _ in range(repeats + 1):
        start = time.perf_counter()
        stats = stream_weights(transport, tensors(), bucket_bytes=bucket_bytes)
        transport.channel.barrier()
        sync_times.append(time.perf_counter() - start)
        buckets = stats.num_buckets
    receiver.join(timeout=120)
    transport.close()
    torch.save(dict(total=total, attention=attention, tensors=count, buckets=buckets,
                    export_s=statistics.median(export_times[1:]), sync_s=statistics.median(sync_times[1:])),
               result_file)


def measure(path: str, bucket_bytes: int, repeats: int) -> dict:
    return run_on_local_ranks(_sync_worker, 1, path, bucket_bytes, repeats)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models (hidden 128, 2 layers)")
    parser.add_argument("--repeats", type=int, default=3, help="timed syncs of each model (median; after one warm-up)")
    parser.add_argument("--bucket_mb", type=int, default=64, help="sync bucket size, as --vllm_sync_bucket_mb")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.bucket_mb < 1:
        parser.error("--repeats and --bucket_mb must be positive")

    from transformers import AutoConfig

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        gqa = reference_model(tmp, quick=args.quick, arch="llama")
        layers = AutoConfig.from_pretrained(gqa).num_hidden_layers
        mla = reference_model(tmp, quick=args.quick, arch="deepseek_v3", first_k_dense_replace=layers)
        for name, path in (("GQA (llama)", gqa), ("MLA (deepseek_v3)", mla)):
            config = AutoConfig.from_pretrained(path)
            if hasattr(config, "kv_lora_rank"):
                kv_per_token = config.kv_lora_rank + config.qk_rope_head_dim  # the latent vLLM caches
            else:
                kv_per_token = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
            r = results[name] = measure(path, args.bucket_mb << 20, args.repeats)
            rows.append((name, r["tensors"], r["attention"] / 1e6, r["total"] / 1e6, r["buckets"],
                         r["export_s"] * 1e3, r["sync_s"] * 1e3, r["total"] / 1e6 / r["sync_s"], kv_per_token))
    gqa_r, mla_r = results["GQA (llama)"], results["MLA (deepseek_v3)"]
    rows.append(("ratio MLA / GQA", "", mla_r["attention"] / gqa_r["attention"], mla_r["total"] / gqa_r["total"], "",
                 mla_r["export_s"] / gqa_r["export_s"], mla_r["sync_s"] / gqa_r["sync_s"], "",
                 rows[1][-1] / rows[0][-1]))
    print_table("weight sync per update, trainer side (fp32 on CPU; gloo to one receiver that loads nothing)",
                ["model", "tensors", "attention MB", "total MB", "buckets", "export ms", "export+stream ms",
                 "MB/s", "KV cache elems/token/layer"], rows)


if __name__ == "__main__":
    main()
