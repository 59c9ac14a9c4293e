"""The cost of durable checkpoints: the sharded checkpoint write with CRC-32 checksums and fsync
against the same write without them, and both against a plain file copy of the same bytes.

    python -m tools.bench.bench_checkpoint [--quick] [--repeats 5] [--dir DIR]

On workload W's model (DESIGN.md), one rank: (a) ``save_sharded`` as trainers write it (every
file fsynced and checksummed, the manifest and the directories fsynced around the rename), (b)
the same save with ``durable=False`` (sizes only, no fsync: what it cost before), (c) copying the
checkpoint's files with ``shutil.copyfile`` (the floor: the same bytes written, no framework),
(d) that copy with an fsync of every file and the directory (the floor of a durable write), and
(e) verifying a checkpoint on resume with and without checksums, and (f) the training step time
with a resumable checkpoint (model + Adam state) after every step, synchronous or ``--async_save``
(the background writer's own time beside it), against steps without checkpoints (the three
alternate step by step). Durable and plain saves
alternate, each figure is the median of ``--repeats``, and the durable / plain time ratio is also
taken pair by pair (robust to a machine whose speed drifts). ``--dir`` picks the file system
(default: a temporary directory under the current one, so the disk checkpoints would use).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tools.bench.common import print_table, reference_model, run_on_local_ranks


def _save(model, adapter, hf_path: str, directory: str, *, durable: bool) -> float:
    import torch.distributed as dist

    from models.mcore_checkpoint import save_sharded

    dist.barrier()
    start = time.perf_counter()
    save_sharded({"model": model.sharded_state_dict()}, directory, adapter=adapter, hf_source_dir=hf_path,
                 padded_vocab_size=model.vocab_size, durable=durable)
    return time.perf_counter() - start


def _copy(source: Path, destination: Path, *, fsync: bool) -> float:
    from models.durable_io import fsync_directory, fsync_file

    start = time.perf_counter()
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        target = destination / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
        if fsync:
            fsync_file(target)
    if fsync:
        fsync_directory(destination)
    return time.perf_counter() - start


def _verify(directory: str, *, checksums: bool) -> float:
    from models.mcore_checkpoint import verify_checkpoint

    start = time.perf_counter()
    verify_checkpoint(directory, checksums=checksums)
    return time.perf_counter() - start


def _worker(hf_path: str, workdir: str, repeats: int, result_file: str) -> None:
    import torch

    from models.builder import build_model
    from models.registry import load_adapter
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    config = ParallelConfig()
    adapter = load_adapter(hf_path)
    initialize_parallel(config)
    model = build_model(adapter, config)
    seconds: dict[str, list[float]] = {key: [] for key in ("durable", "plain", "copy", "copy_fsync", "verify_crc",
                                                           "verify_size")}
    kept = f"{workdir}/kept"
    _save(model, adapter, hf_path, kept, durable=True)  # warm-up, and the checkpoint the copies read
    nbytes = sum(p.stat().st_size for p in Path(kept).rglob("*") if p.is_file())
    for i in range(repeats):
        for durable in ((False, True) if i % 2 else (True, False)):
            directory = f"{workdir}/save_{i}_{durable}"
            seconds["durable" if durable else "plain"].append(_save(model, adapter, hf_path, directory,
                                                                    durable=durable))
            shutil.rmtree(directory)
        for fsync in (False, True):
            copy = Path(f"{workdir}/copy_{i}_{fsync}")
            seconds["copy_fsync" if fsync else "copy"].append(_copy(Path(kept), copy, fsync=fsync))
            shutil.rmtree(copy)
        seconds["verify_crc"].append(_verify(kept, checksums=True))
        seconds["verify_size"].append(_verify(kept, checksums=False))
    # The durable / plain ratio pair by pair (each pair ran back to back): robust to the machine's drift.
    pairs = statistics.median(d / p for d, p in zip(seconds["durable"], seconds["plain"]))
    torch.save({"nbytes": nbytes, "pair_ratio": pairs,
                **{key: statistics.median(values) for key, values in seconds.items()}}, result_file)


def _microbatches(vocab_size: int, *, seq: int = 128) -> list[dict]:
    import torch

    ids = torch.randint(5, vocab_size, (2, 4, seq + 1), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": b[:, :-1], "labels": b[:, 1:], "loss_mask": torch.ones(4, seq),
             "position_ids": torch.arange(seq).expand(4, seq)} for b in ids]


def _step_worker(hf_path: str, workdir: str, steps: int, result_file: str) -> None:
    """Median step time (train step + the checkpoint call) with no / synchronous / background
    checkpoints after every step, the modes alternating step by step."""
    import torch
    from megatron.core import tensor_parallel

    from engine.runtime.config import CheckpointConfig, EngineConfig
    from engine.runtime.engine import TrainingEngine

    engine = TrainingEngine(EngineConfig(pretrain=hf_path), total_steps=3 * steps + 1)
    batches = _microbatches(engine.vocab_size)
    scale = engine.loss_scale(batches)

    def loss_fn(logits, batch):
        loss_sum = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch["labels"]).sum()
        return loss_sum * scale, {"loss_sum": loss_sum.detach(), "num_tokens": batch["loss_mask"].sum()}

    configs = {"none": None, "sync": CheckpointConfig(ckpt_path=f"{workdir}/sync", max_ckpt_num=1),
               "async": CheckpointConfig(ckpt_path=f"{workdir}/async", max_ckpt_num=1, async_save=True)}
    seconds: dict[str, list[float]] = {mode: [] for mode in configs}
    write_s, number = [], 0
    engine.train_step(batches, loss_fn, normaliser_key="num_tokens")  # warm-up
    for _ in range(steps):
        for mode, config in configs.items():
            number += 1
            start = time.perf_counter()
            metrics = engine.train_step(batches, loss_fn, normaliser_key="num_tokens").metrics
            if config is not None:
                engine.save_checkpoint(config, number, {"step": number})
            seconds[mode].append(time.perf_counter() - start)
            write_s += [metrics["checkpoint/write_s"]] if "checkpoint/write_s" in metrics else []
    engine.checkpoint_writer.wait()
    torch.save({**{mode: statistics.median(values) for mode, values in seconds.items()},
                "write_s": statistics.median(write_s) if write_s else float("nan")}, result_file)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model instead of W")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=".", help="file system to write on (a temporary directory under it)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per checkpoint mode")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_checkpoint_") as tmp:
        hf = reference_model(tmp, quick=args.quick)
        result = run_on_local_ranks(_worker, 1, hf, tmp, args.repeats)
        steps = run_on_local_ranks(_step_worker, 1, hf, tmp, args.steps)
    mb = result["nbytes"] / 1e6
    copy = result["copy"]
    rows = [
        ("plain file copy (floor)", mb / copy, 1.0, ""),
        ("file copy + fsync of every file", mb / result["copy_fsync"], copy / result["copy_fsync"], ""),
        ("checkpoint save, sizes only, no fsync (before)", mb / result["plain"], copy / result["plain"], 1.0),
        ("checkpoint save, CRC-32 + fsync (now)", mb / result["durable"], copy / result["durable"],
         result["plain"] / result["durable"]),
    ]
    print_table(f"checkpoint write, {mb:.0f} MB, median of {args.repeats} ({os.path.abspath(args.dir)})",
                ["write", "MB/s", "vs copy", "vs save before"], rows)
    print(f"durable save time / plain save time, median of {args.repeats} back-to-back pairs: "
          f"{result['pair_ratio']:.2f}x")
    print_table("checkpoint verify on resume", ["check", "MB/s", "seconds"], [
        ("sizes (before)", mb / result["verify_size"], result["verify_size"]),
        ("sizes + CRC-32 of every byte (now)", mb / result["verify_crc"], result["verify_crc"]),
    ])
    base = steps["none"]
    print_table(f"training step with a resumable checkpoint after every step, median of {args.steps}",
                ["checkpoint", "step s", "vs no checkpoint"], [
        ("none", base, 1.0),
        ("synchronous", steps["sync"], steps["sync"] / base),
        ("--async_save", steps["async"], steps["async"] / base),
    ])
    print(f"--async_save: the background writer took {steps['write_s']:.3f} s per checkpoint (median), "
          f"the training thread {steps['async'] - base:.3f} s more per step than without checkpoints")


if __name__ == "__main__":
    main()
