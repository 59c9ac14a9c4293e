"""Shared pieces of the conversion CLIs."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism of the Megatron model")
    group.add_argument("--tensor_model_parallel_size", type=int, default=1)
    group.add_argument("--pipeline_model_parallel_size", type=int, default=1)
    group.add_argument("--expert_model_parallel_size", type=int, default=1)


def parallel_config(args):
    from parallel.config import ParallelConfig

    return ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
    )


def world_size(args) -> int:
    """TP x PP x EP ranks: Megatron carves expert parallelism out of data parallelism."""
    return args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.expert_model_parallel_size


def check_output_dir(path: str, overwrite: bool, flag: str = "--save_path") -> None:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SystemExit(f"error: {flag} {path} exists and is not empty; pass --overwrite to replace it")
