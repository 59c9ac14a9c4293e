"""KTO on unpaired preference data on Megatron-core (OpenRLHF's train_kto flags).

    torchrun --nproc_per_node 2 -m engine.cli.train_kto --pretrain SFT_HF [--ref_pretrain REF_HF] \\
        --dataset kto.jsonl --input_key prompt --output_key completion --label_key label \\
        --beta 0.1 --desirable_loss_weight 1.0 --undesirable_loss_weight 1.0 \\
        --tensor_model_parallel_size 2 --train_batch_size 64 --micro_train_batch_size 4 --save_path out/kto

``--label_key`` names a boolean column (true / 1: desirable). The KL reference point is
estimated on mismatched prompt / completion pairs of each step. Without torchrun,
``--nproc_per_node N`` spawns N local ranks itself.
"""
from __future__ import annotations

from engine.cli.args import launch, offline_parser, offline_trainer_config, pad_token_id
from engine.cli.data_args import data_config, load_splits


def add_kto_args(parser) -> None:
    g = parser.add_argument_group("KTO")
    g.add_argument("--ref_pretrain", default=None, help="reference HF directory (default: --pretrain)")
    g.add_argument("--ref_offload", action="store_true", help="keep the reference in host memory between uses (GPU)")
    g.add_argument("--beta", type=float, default=0.1)
    g.add_argument("--desirable_loss_weight", type=float, default=1.0)
    g.add_argument("--undesirable_loss_weight", type=float, default=1.0)


def parse_args(argv=None):
    return offline_parser(__doc__, learning_rate=5e-7, add_trainer_args=add_kto_args).parse_args(argv)


def kto_config(args):
    from engine.trainers.kto import KTOConfig

    return KTOConfig(beta=args.beta, desirable_loss_weight=args.desirable_loss_weight,
                     undesirable_loss_weight=args.undesirable_loss_weight, ref_pretrain=args.ref_pretrain,
                     ref_offload=args.ref_offload)


def train(args) -> list[dict]:
    from engine.data.preference import UnpairedPreferenceDataset
    from engine.trainers.kto import KTOTrainer

    tokenizer, train_set, eval_set = load_splits(UnpairedPreferenceDataset, args)
    trainer = KTOTrainer(offline_trainer_config(args), train_set, eval_set, kto=kto_config(args),
                         pad_token_id=pad_token_id(tokenizer), max_len=args.max_len)
    return trainer.fit()


def main(argv=None) -> None:
    args = parse_args(argv)
    config = offline_trainer_config(args)  # validate flags before starting processes
    if data_config(args).label_key is None:
        raise SystemExit("--label_key is required: the column saying whether a completion is desirable")
    kto_config(args)
    launch(train, args, config)


if __name__ == "__main__":
    main()
