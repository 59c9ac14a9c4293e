"""Process reward model training on Megatron-core (OpenRLHF's train_prm flags).

    torchrun --nproc_per_node 2 -m engine.cli.train_prm --pretrain HF_DIR --dataset prm.jsonl \\
        --input_key input --label_key value --placeholder_token "ки" --reward_tokens "+" "-" \\
        --tensor_model_parallel_size 2 --train_batch_size 32 --micro_train_batch_size 4 --save_path out/prm

The causal LM head is trained to predict a step's reward token at the placeholder that follows
it (cross-entropy over the ``--reward_tokens`` ids). Without torchrun, ``--nproc_per_node N``
spawns N local ranks itself.
"""
from __future__ import annotations

from engine.cli.args import launch, offline_parser, offline_trainer_config, pad_token_id
from engine.cli.data_args import data_config, load_splits


def add_prm_args(parser) -> None:
    g = parser.add_argument_group("process reward")
    g.add_argument("--placeholder_token", required=True, help="single token after every step, e.g. 'ки'")
    g.add_argument("--reward_tokens", nargs="*", default=None,
                   help="label tokens, positive first (e.g. + -); default: the whole vocabulary")


def parse_args(argv=None):
    return offline_parser(__doc__, learning_rate=1e-6, add_trainer_args=add_prm_args).parse_args(argv)


def train(args) -> list[dict]:
    from engine.data.process_reward import ProcessRewardDataset
    from engine.trainers.prm import PRMTrainer

    tokenizer, train_set, eval_set = load_splits(ProcessRewardDataset, args, placeholder_token=args.placeholder_token,
                                                 reward_tokens=args.reward_tokens)
    reward_ids = list(train_set.reward_token_ids.values()) if train_set.reward_token_ids else None
    trainer = PRMTrainer(offline_trainer_config(args), train_set, eval_set, reward_token_ids=reward_ids,
                         pad_token_id=pad_token_id(tokenizer))
    return trainer.fit()


def main(argv=None) -> None:
    args = parse_args(argv)
    config = offline_trainer_config(args)  # validate flags before starting processes
    data = data_config(args)
    if data.label_key is None:
        raise SystemExit("--label_key is required: the column with one label per step")
    launch(train, args, config)


if __name__ == "__main__":
    main()
