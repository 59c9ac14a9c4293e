"""Flag groups shared by the CLIs, each turned into its typed config. Only engine/cli parses flags."""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from engine.runtime.checkpoint import CheckpointConfig
from engine.runtime.engine import EngineConfig
from engine.runtime.logging import LoggingConfig
from engine.runtime.optimizer import OptimConfig
from engine.trainers.base import OfflineTrainerConfig, TrainLoopConfig
from models.builder import ModelBuildConfig
from parallel.config import ParallelConfig


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism (Megatron)")
    g.add_argument("--tensor_model_parallel_size", type=int, default=1)
    g.add_argument("--pipeline_model_parallel_size", type=int, default=1)
    g.add_argument("--context_parallel_size", "--ring_attn_size", dest="context_parallel_size", type=int, default=1)
    g.add_argument("--ring_head_stride", type=int, default=None, help="KV heads per ring pass (default: all)")
    g.add_argument("--expert_model_parallel_size", type=int, default=1)
    g.add_argument("--sequence_parallel", action="store_true")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--pretrain", required=True, help="HF model directory to start from")
    g.add_argument("--bf16", action="store_true", help="bf16 weights and compute (GPU)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="full activation recompute")
    g.add_argument("--aux_loss_coef", type=float, default=None, help="MoE load-balancing loss coefficient")
    g.add_argument("--seed", type=int, default=42)


def add_optim_args(parser: argparse.ArgumentParser, *, learning_rate: float = 1e-5) -> None:
    g = parser.add_argument_group("optimizer")
    g.add_argument("--learning_rate", type=float, default=learning_rate)
    g.add_argument("--lr_warmup_ratio", type=float, default=0.03)
    g.add_argument("--lr_scheduler", default="cosine_with_min_lr", help="cosine_with_min_lr | constant | linear")
    g.add_argument("--min_lr_ratio", type=float, default=0.1)
    g.add_argument("--l2", type=float, default=0.0, help="weight decay")
    g.add_argument("--adam_betas", type=float, nargs=2, default=(0.9, 0.95))
    g.add_argument("--max_norm", type=float, default=1.0, help="gradient clipping (0 disables)")


def add_loop_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training loop")
    g.add_argument("--max_epochs", type=int, default=1)
    g.add_argument("--max_steps", type=int, default=None)
    g.add_argument("--train_batch_size", type=int, default=128)
    g.add_argument("--micro_train_batch_size", type=int, default=8)
    g.add_argument("--eval_steps", type=int, default=-1)
    g.add_argument("--save_path", default=None, help="final HF checkpoint directory")
    g.add_argument("--save_hf_ckpt", action="store_true", help="also export HF weights with each checkpoint")
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--ckpt_path", default=None, help="directory of resumable training checkpoints")
    g.add_argument("--save_steps", type=int, default=-1)
    g.add_argument("--max_ckpt_num", type=int, default=3)
    g.add_argument("--load_checkpoint", action="store_true", help="resume from the newest valid checkpoint")
    g = parser.add_argument_group("logging")
    g.add_argument("--logging_steps", type=int, default=1)
    g.add_argument("--use_tensorboard", default=None, metavar="DIR")
    g.add_argument("--use_wandb", default=None, metavar="KEY|offline")
    g.add_argument("--wandb_project", default="megatron-rlhf")
    g.add_argument("--wandb_run_name", default=None)


def parallel_config(args) -> ParallelConfig:
    return ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
    )


def engine_config(args, *, value_head: bool = False) -> EngineConfig:
    overrides = {}
    if args.aux_loss_coef is not None:
        overrides["moe_aux_loss_coeff"] = args.aux_loss_coef
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return EngineConfig(
        pretrain=args.pretrain,
        parallel=parallel_config(args),
        optim=OptimConfig(
            learning_rate=args.learning_rate,
            lr_warmup_ratio=args.lr_warmup_ratio,
            lr_scheduler=args.lr_scheduler,
            min_lr_ratio=args.min_lr_ratio,
            weight_decay=args.l2,
            adam_betas=tuple(args.adam_betas),
            max_norm=args.max_norm,
            bf16=args.bf16,
        ),
        build=ModelBuildConfig(
            params_dtype=dtype,
            value_head=value_head,
            recompute_granularity="full" if args.gradient_checkpointing else None,
            ring_head_stride=args.ring_head_stride,
            overrides=overrides,
        ),
        seed=args.seed,
    )


def offline_trainer_config(args, *, value_head: bool = False) -> OfflineTrainerConfig:
    return OfflineTrainerConfig(
        engine=engine_config(args, value_head=value_head),
        loop=TrainLoopConfig(
            max_epochs=args.max_epochs,
            train_batch_size=args.train_batch_size,
            micro_train_batch_size=args.micro_train_batch_size,
            max_steps=args.max_steps,
            eval_steps=args.eval_steps,
            save_path=args.save_path,
            save_hf_ckpt=args.save_hf_ckpt,
        ),
        checkpoint=CheckpointConfig(
            ckpt_path=args.ckpt_path,
            save_steps=args.save_steps,
            max_ckpt_num=args.max_ckpt_num,
            load_checkpoint=args.load_checkpoint,
        ),
        logging=LoggingConfig(
            logging_steps=args.logging_steps,
            use_tensorboard=args.use_tensorboard,
            use_wandb=args.use_wandb,
            wandb_project=args.wandb_project,
            wandb_run_name=args.wandb_run_name,
        ),
    )


# ----- what every offline trainer CLI shares --------------------------------------------------
def offline_parser(description: str, *, learning_rate: float,
                   add_trainer_args: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    """The flag groups of a torchrun-launched offline trainer, plus its own (``add_trainer_args``)."""
    from engine.cli.data_args import add_data_args

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc_per_node", type=int, default=None, help="ranks to spawn when not under torchrun")
    add_model_args(parser)
    if add_trainer_args is not None:
        add_trainer_args(parser)
    add_parallel_args(parser)
    add_optim_args(parser, learning_rate=learning_rate)
    add_loop_args(parser)
    add_data_args(parser)
    return parser


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def launch(train: Callable, args, config: OfflineTrainerConfig) -> None:
    """Run ``train(args)`` on every rank: TP x PP x CP ranks unless ``--nproc_per_node`` says more."""
    from parallel.launch import run_on_ranks

    run_on_ranks(train, args.nproc_per_node or config.engine.parallel.model_parallel_size, args)
