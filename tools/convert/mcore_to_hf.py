"""Export a sharded Megatron checkpoint (any layout) as a HuggingFace model directory.

    python -m tools.convert.mcore_to_hf --load_path MCORE_DIR --save_path HF_DIR

Loads under the layout given here (default: one process), streams HF-named tensors into
safetensors shards with an index, and copies config and tokenizer files, so that
``AutoModelForCausalLM.from_pretrained(HF_DIR)`` loads the result.
"""
from __future__ import annotations

import argparse

from tools.convert.common import add_parallel_args, check_output_dir, parallel_config, world_size


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load_path", required=True, help="Megatron checkpoint directory")
    parser.add_argument("--save_path", required=True, help="output HF directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --save_path")
    parser.add_argument("--max_shard_size_mb", type=int, default=2048, help="size of each safetensors file")
    add_parallel_args(parser)
    return parser.parse_args(argv)


def convert(args) -> None:
    import torch.distributed as dist

    from models.builder import ModelBuildConfig, build_model
    from models.mcore_checkpoint import HF_DIR, load_model, verify_checkpoint
    from models.registry import load_adapter
    from models.weights import save_hf_checkpoint
    from parallel.initialize import initialize_parallel

    meta = verify_checkpoint(args.load_path)
    hf_dir = f"{args.load_path}/{HF_DIR}"
    adapter = load_adapter(hf_dir)
    config = parallel_config(args)
    initialize_parallel(config)
    value_head = meta.get("value_head", False)
    build = ModelBuildConfig(padded_vocab_size=meta["padded_vocab_size"], value_head=value_head)
    model = build_model(adapter, config, build)
    load_model(model, args.load_path)
    save_hf_checkpoint(
        model, adapter, args.save_path, source_dir=hf_dir,
        max_shard_bytes=args.max_shard_size_mb << 20, progress=dist.get_rank() == 0,
    )
    if dist.get_rank() == 0:
        print(f"saved HF model to {args.save_path}")
    dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    check_output_dir(args.save_path, args.overwrite)
    from models.mcore_checkpoint import verify_checkpoint
    from parallel.launch import run_on_ranks

    verify_checkpoint(args.load_path)
    run_on_ranks(convert, world_size(args), args)


if __name__ == "__main__":
    main()
