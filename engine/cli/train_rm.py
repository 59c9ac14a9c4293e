"""Pairwise reward model training on Megatron-core (OpenRLHF's train_rm flags).

    torchrun --nproc_per_node 2 -m engine.cli.train_rm --pretrain SFT_HF --dataset prefs.jsonl \\
        --prompt_key prompt --chosen_key chosen --rejected_key rejected --apply_chat_template \\
        --tensor_model_parallel_size 2 --train_batch_size 64 --micro_train_batch_size 4 --save_path out/rm

A scalar head on the decoder is read at each sequence's eos; the loss is
``-logsigmoid(r_chosen - r_rejected - margin)`` (``margin``: the row's margin column, else 0).
The HF export loads with ``AutoModelForSequenceClassification`` (``score`` head) and records
the reward ``mean`` / ``std`` in its config. Without torchrun, ``--nproc_per_node N`` spawns N
local ranks itself.
"""
from __future__ import annotations

from engine.cli.args import launch, offline_parser, offline_trainer_config, pad_token_id
from engine.cli.data_args import data_config, load_splits


def parse_args(argv=None):
    return offline_parser(__doc__, learning_rate=9e-6).parse_args(argv)


def train(args) -> list[dict]:
    from engine.data.preference import PreferenceDataset
    from engine.trainers.rm import RewardModelTrainer

    tokenizer, train_set, eval_set = load_splits(PreferenceDataset, args)
    trainer = RewardModelTrainer(offline_trainer_config(args, value_head=True), train_set, eval_set,
                                 pad_token_id=pad_token_id(tokenizer))
    return trainer.fit()


def main(argv=None) -> None:
    args = parse_args(argv)
    config = offline_trainer_config(args, value_head=True)  # validate flags before starting processes
    data_config(args)
    launch(train, args, config)


if __name__ == "__main__":
    main()
