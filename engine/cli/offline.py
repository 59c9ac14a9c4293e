"""What every offline trainer CLI (SFT, RM, DPO, KTO, PRM, KD) shares: its job's option groups,
the launch on local ranks or under torchrun, and the tokenizer / split loading."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

from engine.cli.options import group, parse_job
from engine.data.config import DataConfig
from engine.trainers.base import OfflineTrainerConfig
from parallel.options import option

# DataConfig fields each kind of dataset does not read: they are not flags of that job.
NOT_READ_BY_SFT = ("label_key", "chosen_key", "rejected_key", "prompt_key", "prompt_max_len")
NOT_READ_BY_PAIRS = ("input_key", "output_key", "label_key", "prompt_max_len", "pretrain_mode", "packing_samples")
NOT_READ_BY_UNPAIRED = ("chosen_key", "rejected_key", "prompt_key", "prompt_max_len", "pretrain_mode",
                        "packing_samples")
NOT_READ_BY_PRM = ("output_key", "chosen_key", "rejected_key", "prompt_key", "prompt_max_len", "pretrain_mode",
                   "packing_samples")


@dataclass(kw_only=True)
class LaunchOptions:
    """How the ranks start."""

    nproc_per_node: int | None = option(
        None, help="ranks to spawn on this machine when not under torchrun (default: the smallest world the "
                   "parallel sizes fit, TP x PP x CP (x what EP needs); data parallelism takes the rest). "
                   "Under torchrun the world is torchrun's: use torchrun's own --nnodes / --nproc_per_node")


def trainer_group(learning_rate: float):
    return group(title="training", defaults={"engine.optim.learning_rate": learning_rate})


def launch_group():
    return group(title="launch", factory=LaunchOptions)


def data_group(not_read: tuple[str, ...]):
    return group(title="data", exclude=not_read)


@dataclass(kw_only=True)
class OfflineJob:
    """The groups every offline job has; subclasses add theirs and set the defaults."""

    launch: LaunchOptions
    trainer: OfflineTrainerConfig
    data: DataConfig
    # --seed (the engine's) also orders the dataset mixing.
    derived: ClassVar[dict[str, str]] = {"data.seed": "trainer.engine.seed"}


def parse_offline(job_cls, argv, description: str, *, value_head: bool = False):
    overrides = {"trainer.engine.build.value_head": True} if value_head else None
    return parse_job(job_cls, argv, description=description, overrides=overrides)


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_splits(dataset_cls, job: OfflineJob, **options):
    """``(tokenizer, train_set, eval_set or None)``: ``--dataset`` tokenised by ``--pretrain``'s tokenizer."""
    from transformers import AutoTokenizer

    data = job.data
    tokenizer = AutoTokenizer.from_pretrained(job.trainer.engine.pretrain)
    train_set = dataset_cls.from_config(data, tokenizer, split=data.train_split, **options)
    eval_set = dataset_cls.from_config(data, tokenizer, split=data.eval_split, **options) if data.eval_split else None
    return tokenizer, train_set, eval_set


def launch(train: Callable, job: OfflineJob) -> None:
    """Run ``train(job)`` on every rank: torchrun's world, or ``--nproc_per_node`` ranks spawned here."""
    from parallel.launch import run_on_ranks

    run_on_ranks(train, job, grid=job.trainer.engine.parallel, nproc_per_node=job.launch.nproc_per_node)
