"""Convert a HuggingFace checkpoint into a sharded Megatron checkpoint of a given TP/PP/EP layout.

    python -m tools.convert.hf_to_mcore --hf_path HF_DIR --save_path MCORE_DIR \\
        --tensor_model_parallel_size 2 --pipeline_model_parallel_size 2 [--expert_model_parallel_size 2]

Spawns TP x PP local processes (or runs under torchrun); each reads only its own slices.
"""
from __future__ import annotations

import argparse

from tools.convert.common import add_parallel_args, check_output_dir, parallel_config, world_size


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_path", required=True, help="HF model directory (safetensors)")
    parser.add_argument("--save_path", required=True, help="output Megatron checkpoint directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --save_path")
    add_parallel_args(parser)
    return parser.parse_args(argv)


def convert(args) -> None:
    import torch.distributed as dist

    from models.builder import build_model
    from models.mcore_checkpoint import save_model
    from models.registry import load_adapter
    from models.weights import load_hf_weights
    from parallel.initialize import initialize_parallel

    config = parallel_config(args)
    adapter = load_adapter(args.hf_path)
    initialize_parallel(config)
    model = build_model(adapter, config)
    load_hf_weights(model, adapter, args.hf_path, progress=dist.get_rank() == 0)
    save_model(model, args.save_path, adapter=adapter, hf_source_dir=args.hf_path)
    if dist.get_rank() == 0:
        print(f"saved Megatron checkpoint to {args.save_path}")
    dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    check_output_dir(args.save_path, args.overwrite)
    from models.registry import load_adapter
    from parallel.launch import run_on_ranks

    adapter = load_adapter(args.hf_path)  # fail fast on unsupported architectures / bad sizes
    parallel_config(args).validate_model(
        num_layers=adapter.num_layers,
        num_attention_heads=adapter.attention.num_heads,
        num_query_groups=adapter.attention.num_kv_heads,
        num_experts=adapter.num_experts,
    )
    run_on_ranks(convert, world_size(args), args)


if __name__ == "__main__":
    main()
