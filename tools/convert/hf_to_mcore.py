"""Convert a HuggingFace checkpoint into a sharded Megatron checkpoint of a given TP/PP/EP layout.

    python -m tools.convert.hf_to_mcore --hf_path HF_DIR --save_path MCORE_DIR \\
        --tensor_model_parallel_size 2 --pipeline_model_parallel_size 2 [--expert_model_parallel_size 2]

Spawns TP x PP x EP local processes, or runs under torchrun at any multiple of that (data-parallel
replicas read the same slices); each rank reads only its own slices.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.cli.options import group, naming_flags, parse_job, run_cli
from parallel.config import ParallelConfig
from parallel.options import option
from tools.convert.common import check_output_dir, parallel_group


@dataclass(kw_only=True)
class ToMcorePaths:
    """Where the HF model comes from and the Megatron checkpoint goes."""

    hf_path: str = option(help="HF model directory (safetensors)")
    save_path: str = option(help="output Megatron checkpoint directory")
    overwrite: bool = option(False, help="replace a non-empty --save_path")


@dataclass(kw_only=True)
class ToMcoreJob:
    paths: ToMcorePaths = group(title="paths")
    parallel: ParallelConfig = parallel_group()


def parse_args(argv=None) -> ToMcoreJob:
    return parse_job(ToMcoreJob, argv, description=__doc__)


def convert(args: ToMcoreJob) -> None:
    import torch.distributed as dist

    from models.builder import ModelBuildConfig, build_model
    from models.mcore_checkpoint import save_model
    from models.registry import load_adapter
    from models.sources import ModelSource
    from models.weights import load_hf_weights
    from parallel.initialize import initialize_parallel

    config, paths = args.parallel, args.paths
    adapter = load_adapter(paths.hf_path)
    initialize_parallel(config)
    # A reward model / critic (*ForSequenceClassification) keeps its value head.
    value_head = ModelSource.open(paths.hf_path, flag="--hf_path").value_head is True
    model = build_model(adapter, config, ModelBuildConfig(value_head=value_head))
    load_hf_weights(model, adapter, paths.hf_path, progress=dist.get_rank() == 0)
    save_model(model, paths.save_path, adapter=adapter, hf_source_dir=paths.hf_path)
    if dist.get_rank() == 0:
        print(f"saved Megatron checkpoint to {paths.save_path}")
    dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    check_output_dir(args.paths.save_path, args.paths.overwrite)
    from models.registry import load_adapter
    from parallel.launch import run_on_ranks

    with naming_flags(ToMcoreJob, "parallel"):  # fail fast on unsupported architectures / bad sizes
        adapter = load_adapter(args.paths.hf_path)
        args.parallel.validate_model(
            num_layers=adapter.num_layers,
            num_attention_heads=adapter.attention.num_heads,
            num_query_groups=adapter.attention.num_kv_heads,
            num_experts=adapter.num_experts,
        )
    run_on_ranks(convert, args, grid=args.parallel)


if __name__ == "__main__":
    run_cli(main)
