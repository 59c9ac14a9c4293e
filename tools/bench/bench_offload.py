"""Parking a trainable model's state in host memory and back (``--megatron_enable_sleep``) against
a plain copy of the same bytes out and in (the floor).

    python -m tools.bench.bench_offload [--quick] [--repeats 5]

On workload W's model (DESIGN.md) after one optimizer step (so Adam's moments exist): the time
to park weights + gradients + optimizer state and to restore them, and the time to copy one
buffer of the same size to host memory and back. On GPU both sides run device <-> pinned host;
on CPU the floor is a memory copy. Gradients are freed and zeroed rather than copied, yet count
in the bytes of both sides: the ratio is the time the whole hand-over costs against copying it all.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from tools.bench.common import print_table, reference_model, run_on_local_ranks


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _copy_floor(nbytes: int, device: torch.device, repeats: int) -> float:
    """Seconds per out-and-back copy of ``nbytes`` between ``device`` and (pinned) host memory."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    best = float("inf")
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        host.copy_(source, non_blocking=True)
        _synchronize()
        source.copy_(host, non_blocking=True)
        _synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _park_and_restore(path, repeats, result_file):
    from megatron.core import tensor_parallel

    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig

    engine = TrainingEngine(EngineConfig(pretrain=path, optim=OptimConfig(lr_warmup_ratio=0.0)), total_steps=2)
    ids = torch.randint(5, engine.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "position_ids": torch.arange(64).expand_as(ids)}

    def loss_fn(logits, data):
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), data["labels"]).mean()
        return loss, {"loss": loss.detach()}

    engine.train_step([batch], loss_fn)
    park_s = restore_s = float("inf")
    moved = {}
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        moved = engine.park_training_state()
        _synchronize()
        parked = time.perf_counter()
        engine.restore_training_state()
        _synchronize()
        park_s, restore_s = min(park_s, parked - start), min(restore_s, time.perf_counter() - parked)
    nbytes = sum(moved.values())
    floor_s = _copy_floor(nbytes, engine.device, repeats)
    torch.save({"moved": moved, "park_s": park_s, "restore_s": restore_s, "floor_s": floor_s,
                "device": str(engine.device)}, result_file)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model instead of workload W")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many rounds")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_on_local_ranks(_park_and_restore, 1, reference_model(tmp, quick=args.quick), args.repeats)
    gb = sum(result["moved"].values()) / 1e9
    parts = ", ".join(f"{part} {nbytes / 1e6:.0f} MB" for part, nbytes in result["moved"].items())
    rows = [("copy out and back (floor)", result["floor_s"], gb / result["floor_s"], 1.0),
            ("park + restore", result["park_s"] + result["restore_s"], gb / (result["park_s"] + result["restore_s"]),
             result["floor_s"] / (result["park_s"] + result["restore_s"])),
            ("  park", result["park_s"], gb / result["park_s"], ""),
            ("  restore", result["restore_s"], gb / result["restore_s"], "")]
    print_table(f"training state to host memory and back on {result['device']} ({parts})",
                ["step", "seconds", "GB/s", "ratio vs floor"], rows)


if __name__ == "__main__":
    main()
