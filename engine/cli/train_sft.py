"""Supervised fine-tuning on Megatron-core.

    torchrun --nproc_per_node 2 -m engine.cli.train_sft --pretrain HF_DIR --dataset data.jsonl \\
        --input_key question --output_key answer --apply_chat_template \\
        --tensor_model_parallel_size 2 --train_batch_size 32 --micro_train_batch_size 4 \\
        --save_path out/sft

Without torchrun, ``--nproc_per_node N`` spawns N local ranks itself.
"""
from __future__ import annotations

from engine.cli.args import launch, offline_parser, offline_trainer_config, pad_token_id
from engine.cli.data_args import data_config, load_splits


def parse_args(argv=None):
    return offline_parser(__doc__, learning_rate=5e-6).parse_args(argv)


def train(args) -> list[dict]:
    from engine.data.sft import SFTDataset
    from engine.trainers.sft import SFTTrainer

    data = data_config(args)
    tokenizer, train_set, eval_set = load_splits(SFTDataset, args)
    trainer = SFTTrainer(offline_trainer_config(args), train_set, eval_set, pad_token_id=pad_token_id(tokenizer),
                         packing_samples=data.packing_samples, max_len=data.max_len)
    return trainer.fit()


def main(argv=None) -> None:
    args = parse_args(argv)
    config = offline_trainer_config(args)  # validate flags before starting processes
    data_config(args)
    launch(train, args, config)


if __name__ == "__main__":
    main()
