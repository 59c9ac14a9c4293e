"""Shared pieces of the conversion CLIs: their option groups and the output-directory check."""
from __future__ import annotations

from pathlib import Path

from engine.cli.options import group
from parallel.config import ParallelConfig

# A conversion has no sequence to split: context parallelism and sequence parallelism are not its flags.
CONVERT_PARALLEL_GROUP = dict(title="parallelism of the Megatron model",
                              exclude=("context_parallel_size", "sequence_parallel"))


def parallel_group():
    return group(factory=ParallelConfig, **CONVERT_PARALLEL_GROUP)


def check_output_dir(path: str, overwrite: bool, flag: str = "--save_path") -> None:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SystemExit(f"error: {flag} {path} exists and is not empty; pass --overwrite to replace it")
