"""The cost of durable checkpoints: the sharded checkpoint write with CRC-32 checksums and fsync
against the same write without them, and both against a plain file copy of the same bytes.

    python -m tools.bench.bench_checkpoint [--quick] [--repeats 5] [--dir DIR]

On workload W's model (DESIGN.md), one rank: (a) ``save_sharded`` as trainers write it (every
file fsynced and checksummed, the manifest and the directories fsynced around the rename), (b)
the same save with ``durable=False`` (sizes only, no fsync: what it cost before), (c) copying the
checkpoint's files with ``shutil.copyfile`` (the floor: the same bytes written, no framework),
(d) that copy with an fsync of every file and the directory (the floor of a durable write), and
(e) verifying a checkpoint on resume with and without checksums. Durable and plain saves
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model instead of W")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=".", help="file system to write on (a temporary directory under it)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_checkpoint_") as tmp:
        hf = reference_model(tmp, quick=args.quick)
        result = run_on_local_ranks(_worker, 1, hf, tmp, args.repeats)
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


if __name__ == "__main__":
    main()
