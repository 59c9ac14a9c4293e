"""Ring attention at CP=C (gloo processes) against single-rank causal attention on the same sequence.

    python -m tools.bench.bench_ring_attention --seq_len 8192 --cp_size 2

Each configuration runs in fresh processes with the same total number of CPU threads (the single
rank gets ``cp_size`` threads, each ring rank one), timing forward+backward and measuring the
peak bytes of tensors alive during it on every rank. Baselines, measured in the same run:

* ``single sdpa``: PyTorch SDPA (what ``CoreAttention`` runs without CP; on CPU a fused kernel
  that never materialises the score matrix);
* ``single ring-kernel``: ``ring_attention`` on a one-rank group, i.e. the same block math
  as the ring without communication, which isolates what splitting the sequence buys.
"""
from __future__ import annotations

import argparse
import os
import time
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from parallel.ports import free_port


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created (and still alive) while the mode is active.

    Counts every op's outputs until they are freed, so it sees activations saved for backward,
    transient score blocks and communication buffers; scratch memory inside a fused kernel is
    invisible to it. Deterministic, unlike process RSS.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = id(storage)  # views share their storage object: count it once
        if key in self._seen:
            return
        self._seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, storage.nbytes())

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_len", type=int, default=8192, help="total (global) sequence length")
    parser.add_argument("--cp_size", type=int, default=2, help="context parallel ranks for the ring run")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--num_kv_heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--num_iters", type=int, default=2, help="timed iterations after one warm-up")
    parser.add_argument("--skip_ring_kernel_baseline", action="store_true",
                        help="skip the one-rank ring baseline (it materialises S/2 x S score blocks)")
    args = parser.parse_args(argv)
    if args.seq_len % (2 * args.cp_size):
        parser.error(f"--seq_len ({args.seq_len}) must be divisible by 2 * --cp_size ({2 * args.cp_size})")
    return args


def _attention_fn(kind: str):
    """fwd(q, k, v, cp_group, scale) on [s, b, h, d] shards for the configuration ``kind``."""
    from parallel.attention.core_attention import sdpa_causal
    from parallel.attention.ring import ring_attention

    if kind == "sdpa":
        return lambda q, k, v, group, scale: sdpa_causal(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale).transpose(0, 1)
    return lambda q, k, v, group, scale: ring_attention(q, k, v, cp_group=group, scale=scale)


def _inputs(args, local_len: int):
    dtype = getattr(torch, args.dtype)
    shape = (local_len, args.batch_size)
    q = torch.randn(*shape, args.num_heads, args.head_dim, dtype=dtype, requires_grad=True)
    k = torch.randn(*shape, args.num_kv_heads, args.head_dim, dtype=dtype, requires_grad=True)
    v = torch.randn(*shape, args.num_kv_heads, args.head_dim, dtype=dtype, requires_grad=True)
    return q, k, v


def _step(fn, q, k, v, group, scale) -> None:
    for tensor in (q, k, v):
        tensor.grad = None
    fn(q, k, v, group, scale).sum().backward()


def _worker(rank, world_size, port, kind, args, num_threads, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(num_threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        group = dist.new_group(list(range(world_size)))
        torch.manual_seed(rank)
        q, k, v = _inputs(args, args.seq_len // world_size)
        fn, scale = _attention_fn(kind), args.head_dim ** -0.5
        _step(fn, q, k, v, group, scale)  # warm-up
        times = []
        for _ in range(args.num_iters):
            dist.barrier(group=group)
            start = time.perf_counter()
            _step(fn, q, k, v, group, scale)
            dist.barrier(group=group)  # a ring step is only done when every rank is
            times.append(time.perf_counter() - start)
        with PeakLiveBytes() as tracker:  # separate run: tracking slows every op down
            _step(fn, q, k, v, group, scale)
        results.put((rank, min(times), tracker.peak))
    finally:
        dist.destroy_process_group()




def _run(kind: str, world_size: int, num_threads: int, args) -> dict:
    """Spawn ``world_size`` ranks; return the slowest rank's time and the largest per-rank peak."""
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(world_size, free_port(), kind, args, num_threads, results), nprocs=world_size)
    rows = [results.get() for _ in range(world_size)]
    return {"time_s": max(r[1] for r in rows), "peak_bytes": max(r[2] for r in rows),
            "ranks": world_size, "threads": num_threads}


def _print_table(args, rows: dict) -> None:
    print(f"\nseq_len={args.seq_len} batch={args.batch_size} heads={args.num_heads} "
          f"kv_heads={args.num_kv_heads} head_dim={args.head_dim} dtype={args.dtype} (forward+backward)")
    print(f"{'configuration':<24}{'ranks':>6}{'threads/rank':>14}{'time/iter s':>13}{'peak MiB/rank':>15}")
    for name, row in rows.items():
        print(f"{name:<24}{row['ranks']:>6}{row['threads']:>14}{row['time_s']:>13.3f}"
              f"{row['peak_bytes'] / 2**20:>15.1f}")
    ring = rows[f"ring CP={args.cp_size}"]
    for name, row in rows.items():
        if name.startswith("single"):
            print(f"ring/{name}: time x{ring['time_s'] / row['time_s']:.2f}, "
                  f"peak memory per rank x{ring['peak_bytes'] / row['peak_bytes']:.3f}")


def main(argv=None) -> None:
    args = _parse_args(argv)
    rows = {"single sdpa": _run("sdpa", 1, args.cp_size, args)}
    if not args.skip_ring_kernel_baseline:
        rows["single ring-kernel"] = _run("ring", 1, args.cp_size, args)
    rows[f"ring CP={args.cp_size}"] = _run("ring", args.cp_size, 1, args)
    _print_table(args, rows)


if __name__ == "__main__":
    main()
