"""What every offline trainer CLI (SFT, RM, DPO, KTO, PRM, KD) shares: its job's option groups,
the launch on local ranks or under torchrun, and the tokenizer / split loading."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, ClassVar

from engine.cli.openrlhf_compat import NO_SAVE_PATH
from engine.cli.options import OptionError, group, naming_flags, parse_job, print_notices
from engine.data.config import DataConfig
from engine.trainers.config import OfflineTrainerConfig
from parallel.options import option

# DataConfig fields each kind of dataset does not read: they are not flags of that job.
NOT_READ_BY_SFT = ("label_key", "chosen_key", "rejected_key", "prompt_key", "prompt_max_len")
NOT_READ_BY_PAIRS = ("input_key", "output_key", "label_key", "prompt_max_len", "pretrain_mode", "multiturn")
NOT_READ_BY_UNPAIRED = ("chosen_key", "rejected_key", "prompt_key", "prompt_max_len", "pretrain_mode", "multiturn")
NOT_READ_BY_PRM = ("output_key", "chosen_key", "rejected_key", "prompt_key", "prompt_max_len", "pretrain_mode",
                   "multiturn")


@dataclass(kw_only=True)
class LaunchOptions:
    """How the ranks start."""

    nproc_per_node: int | None = option(
        None, help="ranks to spawn on this machine when not under torchrun (default: the smallest world the "
                   "parallel sizes fit, TP x PP x CP (x what EP needs); data parallelism takes the rest). "
                   "Under torchrun the world is torchrun's: use torchrun's own --nnodes / --nproc_per_node")


def trainer_group(learning_rate: float, *, job: str, defaults: dict | None = None, value_head: bool = False):
    """The trainer's flags with OpenRLHF's defaults of ``train_<job>``: its learning rate, resumable
    checkpoints under ./ckpt/checkpoints_<job> (written only with --save_steps). ``value_head``: the
    job trains a value-head model (its --value_head_prefix is a flag)."""
    return group(title="training", defaults={"engine.optim.learning_rate": learning_rate,
                                             "checkpoint.ckpt_path": f"./ckpt/checkpoints_{job}", **(defaults or {})},
                 exclude=() if value_head else ("engine.build.value_head_prefix",))


def launch_group():
    return group(title="launch", factory=LaunchOptions)


def data_group(not_read: tuple[str, ...], *, defaults: dict | None = None):
    return group(title="data", exclude=not_read, defaults=defaults)


@dataclass(kw_only=True)
class OfflineJob:
    """The groups every offline job has; subclasses add theirs and set the defaults."""

    launch: LaunchOptions
    trainer: OfflineTrainerConfig
    data: DataConfig
    # --seed (the engine's) also orders the dataset mixing.
    derived: ClassVar[dict[str, str]] = {"data.seed": "trainer.engine.seed"}


def parse_offline(job_cls, argv, description: str, *, value_head: bool = False, input_template: str | None = None):
    """``input_template``: the prompt template without --input_template / --apply_chat_template /
    --pretrain_mode (OpenRLHF's SFT, KTO and KD default one)."""
    overrides = {"trainer.engine.build.value_head": True} if value_head else {}
    if input_template is not None:
        overrides["data.default_input_template"] = input_template
    job = parse_job(job_cls, argv, description=description, overrides=overrides)
    if not job.trainer.loop.save_path:
        print_notices([NO_SAVE_PATH])
    return job


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_splits(dataset_cls, job: OfflineJob, **options):
    """``(tokenizer, train_set, eval_set or None)``: ``--dataset`` tokenised by ``--pretrain``'s tokenizer."""
    from models.sources import ModelSource

    data = job.data
    tokenizer = ModelSource.open(job.trainer.engine.pretrain).tokenizer()  # an HF dir or a Megatron checkpoint
    train_set = dataset_cls.from_config(data, tokenizer, split=data.train_split, **options)
    eval_set = dataset_cls.from_config(data, tokenizer, split=data.eval_split, **options) if data.eval_split else None
    return tokenizer, train_set, eval_set


def check_model(job: OfflineJob) -> None:
    """``--pretrain`` against the grid before any rank starts: a path that is no model (or a corrupt
    checkpoint), an unsupported architecture or sizes that do not split fail once, naming the flag."""
    from models.hf_checkpoint import CheckpointError
    from models.sources import ModelSource

    engine = job.trainer.engine
    with naming_flags(type(job), "trainer"):
        try:
            source = ModelSource.open(engine.pretrain, flag="--pretrain")
        except CheckpointError as exc:
            raise ValueError(str(exc)) from exc
        source.check_role(value_head=engine.build.value_head, trainable=True)
        adapter = source.adapter()
        engine.parallel.validate_model(num_layers=adapter.num_layers, num_attention_heads=adapter.attention.num_heads,
                                       num_query_groups=adapter.attention.num_kv_heads, num_experts=adapter.num_experts)


def job_paths(job: OfflineJob) -> dict[str, str | None]:
    """The output paths this job writes, by flag: each is locked for the job's life."""
    return {"--ckpt_path": job.trainer.checkpoint.used_path, "--save_path": job.trainer.loop.save_path}


def holds_job_locks() -> bool:
    """One process per job locks its paths: this launcher, or rank 0 under torchrun (every rank runs
    the launch there)."""
    from parallel.launch import launched_by_torchrun

    return not launched_by_torchrun() or os.environ.get("RANK") == "0"


def launch(train: Callable, job: OfflineJob) -> None:
    """Run ``train(job)`` on every rank: torchrun's world, or ``--nproc_per_node`` ranks spawned here.
    The job's output paths are locked first (``engine.runtime.path_lock``): before any rank writes."""
    from parallel.launch import check_launch, run_on_ranks

    grid = job.trainer.engine.parallel
    # The world first: it is what the launcher got wrong. Checked before megatron-core is imported
    # (the checkpoint module below), so a wrong world fails each rank in seconds.
    check_launch(grid, job.launch.nproc_per_node)
    check_model(job)
    from engine.runtime.checkpoint import check_resumable
    from engine.runtime.path_lock import holding_paths

    try:
        check_resumable(job.trainer.checkpoint)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    with holding_paths(job_paths(job) if holds_job_locks() else {}):
        run_on_ranks(train, job, grid=grid, nproc_per_node=job.launch.nproc_per_node)
