"""Supervised fine-tuning on Megatron-core.

    torchrun --nproc_per_node 2 -m engine.cli.train_sft --pretrain HF_DIR --dataset data.jsonl \\
        --input_key question --output_key answer --apply_chat_template \\
        --tensor_model_parallel_size 2 --train_batch_size 32 --micro_train_batch_size 4 \\
        --save_path out/sft

Without torchrun, ``--nproc_per_node N`` spawns N local ranks itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.cli import offline
from engine.cli.options import group, run_cli
from engine.data.config import OPENRLHF_INPUT_TEMPLATE, DataConfig
from engine.data.token_budget import TokenBudgetConfig
from engine.trainers.config import OfflineTrainerConfig


@dataclass(kw_only=True)
class SFTJob(offline.OfflineJob):
    launch: offline.LaunchOptions = offline.launch_group()
    trainer: OfflineTrainerConfig = offline.trainer_group(5e-6, job="sft", defaults={"loop.max_epochs": 2})
    data: DataConfig = offline.data_group(offline.NOT_READ_BY_SFT)
    budget: TokenBudgetConfig = group(title="token budget", factory=TokenBudgetConfig)


def parse_args(argv=None) -> SFTJob:
    return offline.parse_offline(SFTJob, argv, __doc__, input_template=OPENRLHF_INPUT_TEMPLATE)


def train(job: SFTJob) -> list[dict]:
    from engine.data.sft import SFTDataset
    from engine.trainers.sft import SFTTrainer

    tokenizer, train_set, eval_set = offline.load_splits(SFTDataset, job)
    trainer = SFTTrainer(job.trainer, train_set, eval_set, pad_token_id=offline.pad_token_id(tokenizer),
                         packing_samples=job.data.packing_samples, max_len=job.data.max_len,
                         max_tokens=job.budget.max_tokens)
    return trainer.fit()


def main(argv=None) -> None:
    offline.launch(train, parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
