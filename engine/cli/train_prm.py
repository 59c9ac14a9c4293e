"""Process reward model training on Megatron-core (OpenRLHF's train_prm flags).

    torchrun --nproc_per_node 2 -m engine.cli.train_prm --pretrain HF_DIR --dataset prm.jsonl \\
        --input_key input --label_key value --placeholder_token "ки" --reward_tokens "+" "-" \\
        --tensor_model_parallel_size 2 --train_batch_size 32 --micro_train_batch_size 4 --save_path out/prm

The causal LM head is trained to predict a step's reward token at the placeholder that follows
it (cross-entropy over the ``--reward_tokens`` ids). Without torchrun, ``--nproc_per_node N``
spawns N local ranks itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.cli import offline
from engine.cli.options import group, run_cli
from engine.data.config import DataConfig
from engine.trainers.config import OfflineTrainerConfig
from parallel.options import option


@dataclass(kw_only=True)
class ProcessRewardOptions:
    """Where the step labels go."""

    placeholder_token: str = option(help="single token after every step, e.g. 'ки'")
    reward_tokens: tuple[str, ...] | None = option(
        None, help="label tokens, positive first (e.g. + -); default: the whole vocabulary")


@dataclass(kw_only=True)
class PRMJob(offline.OfflineJob):
    launch: offline.LaunchOptions = offline.launch_group()
    prm: ProcessRewardOptions = group(title="process reward")
    trainer: OfflineTrainerConfig = offline.trainer_group(1e-6, job="prm", defaults={"loop.micro_train_batch_size": 1})
    data: DataConfig = offline.data_group(offline.NOT_READ_BY_PRM)


def parse_args(argv=None) -> PRMJob:
    return offline.parse_offline(PRMJob, argv, __doc__)


def train(job: PRMJob) -> list[dict]:
    from engine.data.process_reward import ProcessRewardDataset
    from engine.trainers.prm import PRMTrainer

    reward_tokens = list(job.prm.reward_tokens) if job.prm.reward_tokens else None
    tokenizer, train_set, eval_set = offline.load_splits(ProcessRewardDataset, job, placeholder_token=job.prm.placeholder_token,
                                                 reward_tokens=reward_tokens)
    reward_ids = list(train_set.reward_token_ids.values()) if train_set.reward_token_ids else None
    trainer = PRMTrainer(job.trainer, train_set, eval_set, reward_token_ids=reward_ids,
                         pad_token_id=offline.pad_token_id(tokenizer), packing_samples=job.data.packing_samples)
    return trainer.fit()


def main(argv=None) -> None:
    job = parse_args(argv)
    if job.data.label_key is None:
        raise SystemExit("--label_key is required: the column with one label per step")
    offline.launch(train, job)


if __name__ == "__main__":
    run_cli(main)
