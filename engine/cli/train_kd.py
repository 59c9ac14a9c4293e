"""Knowledge distillation on Megatron-core: a student learns from a frozen teacher on the same grid.

    torchrun --nproc_per_node 2 -m engine.cli.train_kd --pretrain STUDENT_HF --teacher_model TEACHER_HF \\
        --kd_coef 0.4 --dataset data.jsonl --input_key question --output_key answer --apply_chat_template \\
        --tensor_model_parallel_size 2 --train_batch_size 32 --micro_train_batch_size 4 --save_path out/kd

The loss is ``(1 - kd_coef) * SFT NLL + kd_coef * cross-entropy(teacher || student)`` on response
tokens. Teacher and student must share the tokenizer. Without torchrun, ``--nproc_per_node N``
spawns N local ranks itself.
"""
from __future__ import annotations

from engine.cli.args import launch, offline_parser, offline_trainer_config, pad_token_id
from engine.cli.data_args import data_config, load_splits


def add_kd_args(parser) -> None:
    g = parser.add_argument_group("distillation")
    g.add_argument("--teacher_model", required=True, help="HF directory of the frozen teacher")
    g.add_argument("--kd_coef", type=float, default=0.4, help="weight of the distillation term (1 - it: NLL)")


def parse_args(argv=None):
    return offline_parser(__doc__, learning_rate=5e-6, add_trainer_args=add_kd_args).parse_args(argv)


def kd_config(args):
    from engine.trainers.kd import KDConfig

    return KDConfig(teacher_model=args.teacher_model, kd_coef=args.kd_coef)


def train(args) -> list[dict]:
    from engine.data.sft import SFTDataset
    from engine.trainers.kd import KDTrainer

    data = data_config(args)
    tokenizer, train_set, eval_set = load_splits(SFTDataset, args)
    trainer = KDTrainer(offline_trainer_config(args), train_set, eval_set, kd=kd_config(args),
                        pad_token_id=pad_token_id(tokenizer), packing_samples=data.packing_samples,
                        max_len=data.max_len)
    return trainer.fit()


def main(argv=None) -> None:
    args = parse_args(argv)
    config = offline_trainer_config(args)  # validate flags before starting processes
    data_config(args)
    kd_config(args)
    launch(train, args, config)


if __name__ == "__main__":
    main()
