"""DPO / IPO / cDPO on Megatron-core (OpenRLHF's train_dpo flags).

    torchrun --nproc_per_node 2 -m engine.cli.train_dpo --pretrain SFT_HF [--ref_pretrain REF_HF] \\
        --dataset prefs.jsonl --prompt_key prompt --chosen_key chosen --rejected_key rejected \\
        --beta 0.1 [--ipo | --label_smoothing 0.1] [--nll_loss_coef 0.2] [--ref_offload] \\
        --tensor_model_parallel_size 2 --train_batch_size 64 --micro_train_batch_size 2 --save_path out/dpo

The reference (default: the policy's start) is a frozen Megatron model on the same grid.
Without torchrun, ``--nproc_per_node N`` spawns N local ranks itself.
"""
from __future__ import annotations

from engine.cli.args import launch, offline_parser, offline_trainer_config, pad_token_id
from engine.cli.data_args import data_config, load_splits


def add_dpo_args(parser) -> None:
    g = parser.add_argument_group("DPO")
    g.add_argument("--ref_pretrain", default=None, help="reference HF directory (default: --pretrain)")
    g.add_argument("--ref_offload", action="store_true", help="keep the reference in host memory between uses (GPU)")
    g.add_argument("--beta", type=float, default=0.1)
    g.add_argument("--ipo", action="store_true", help="IPO loss instead of DPO's")
    g.add_argument("--label_smoothing", type=float, default=0.0, help="cDPO: assumed preference label noise")
    g.add_argument("--nll_loss_coef", type=float, default=0.0, help="weight of the chosen responses' NLL")


def parse_args(argv=None):
    return offline_parser(__doc__, learning_rate=5e-7, add_trainer_args=add_dpo_args).parse_args(argv)


def dpo_config(args):
    from engine.trainers.dpo import DPOConfig

    return DPOConfig(beta=args.beta, ipo=args.ipo, label_smoothing=args.label_smoothing,
                     nll_loss_coef=args.nll_loss_coef, ref_pretrain=args.ref_pretrain, ref_offload=args.ref_offload)


def train(args) -> list[dict]:
    from engine.data.preference import PreferenceDataset
    from engine.trainers.dpo import DPOTrainer

    tokenizer, train_set, eval_set = load_splits(PreferenceDataset, args)
    trainer = DPOTrainer(offline_trainer_config(args), train_set, eval_set, dpo=dpo_config(args),
                         pad_token_id=pad_token_id(tokenizer))
    return trainer.fit()


def main(argv=None) -> None:
    args = parse_args(argv)
    config = offline_trainer_config(args)  # validate flags before starting processes
    data_config(args)
    dpo_config(args)
    launch(train, args, config)


if __name__ == "__main__":
    main()
