"""Supervised fine-tuning on Megatron-core.

    torchrun --nproc_per_node 2 -m engine.cli.train_sft --pretrain HF_DIR --dataset data.jsonl \\
        --input_key question --output_key answer --apply_chat_template \\
        --tensor_model_parallel_size 2 --train_batch_size 32 --micro_train_batch_size 4 \\
        --save_path out/sft

Without torchrun, ``--nproc_per_node N`` spawns N local ranks itself.
"""
from __future__ import annotations

import argparse

from engine.cli.args import (
    add_loop_args,
    add_model_args,
    add_optim_args,
    add_parallel_args,
    offline_trainer_config,
)
from engine.cli.data_args import add_data_args, data_config
from parallel.launch import run_on_ranks


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc_per_node", type=int, default=None, help="ranks to spawn when not under torchrun")
    add_model_args(parser)
    add_parallel_args(parser)
    add_optim_args(parser, learning_rate=5e-6)
    add_loop_args(parser)
    add_data_args(parser)
    return parser.parse_args(argv)


def train(args) -> list[dict]:
    from transformers import AutoTokenizer

    from engine.data.sft import SFTDataset
    from engine.trainers.sft import SFTTrainer

    config = offline_trainer_config(args)
    data = data_config(args)
    tokenizer = AutoTokenizer.from_pretrained(args.pretrain)
    train_set = SFTDataset.from_config(data, tokenizer, split=data.train_split)
    eval_set = SFTDataset.from_config(data, tokenizer, split=data.eval_split) if data.eval_split else None
    trainer = SFTTrainer(
        config, train_set, eval_set,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        packing_samples=data.packing_samples, max_len=data.max_len,
    )
    return trainer.fit()


def main(argv=None) -> None:
    args = parse_args(argv)
    config = offline_trainer_config(args)  # validate flags before starting processes
    data_config(args)
    run_on_ranks(train, args.nproc_per_node or config.engine.parallel.model_parallel_size, args)


if __name__ == "__main__":
    main()
