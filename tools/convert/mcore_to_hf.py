"""Export a sharded Megatron checkpoint (any layout) as a HuggingFace model directory.

    python -m tools.convert.mcore_to_hf --load_path MCORE_DIR --save_path HF_DIR

Loads under the layout given here (default: one process), streams HF-named tensors into
safetensors shards with an index, and copies config and tokenizer files, so that
``AutoModelForCausalLM.from_pretrained(HF_DIR)`` loads the result.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.cli.options import group, parse_job, run_cli
from parallel.config import ParallelConfig
from parallel.options import option
from tools.convert.common import check_output_dir, parallel_group


@dataclass(kw_only=True)
class ToHFPaths:
    """Where the Megatron checkpoint comes from and the HF model goes."""

    load_path: str = option(help="Megatron checkpoint directory")
    save_path: str = option(help="output HF directory")
    overwrite: bool = option(False, help="replace a non-empty --save_path")
    max_shard_size_mb: int = option(2048, help="size of each safetensors file")


@dataclass(kw_only=True)
class ToHFJob:
    paths: ToHFPaths = group(title="paths")
    parallel: ParallelConfig = parallel_group()


def parse_args(argv=None) -> ToHFJob:
    return parse_job(ToHFJob, argv, description=__doc__)


def convert(args: ToHFJob) -> None:
    import torch.distributed as dist

    from models.sources import ModelSource
    from parallel.initialize import initialize_parallel

    paths, config = args.paths, args.parallel
    # A converted model or a training checkpoint (<ckpt_path>/global_stepN: its model only), any layout.
    source = ModelSource.open(paths.load_path, flag="--load_path")
    initialize_parallel(config)
    source.export_hf(paths.save_path, parallel=config, max_shard_bytes=paths.max_shard_size_mb << 20,
                     progress=dist.get_rank() == 0)
    if dist.get_rank() == 0:
        print(f"saved HF model to {paths.save_path}")
    dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    check_output_dir(args.paths.save_path, args.paths.overwrite)
    from models.mcore_checkpoint import verify_checkpoint
    from parallel.launch import run_on_ranks

    verify_checkpoint(args.paths.load_path)
    run_on_ranks(convert, args, grid=args.parallel)


if __name__ == "__main__":
    run_cli(main)
