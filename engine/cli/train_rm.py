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

from dataclasses import dataclass

from engine.cli import offline
from engine.cli.options import group, run_cli
from engine.data.config import DataConfig
from engine.trainers.config import OfflineTrainerConfig, RMConfig


@dataclass(kw_only=True)
class RMJob(offline.OfflineJob):
    launch: offline.LaunchOptions = offline.launch_group()
    rm: RMConfig = group(title="reward model", factory=RMConfig)
    trainer: OfflineTrainerConfig = offline.trainer_group(9e-6, job="rm", defaults={"loop.micro_train_batch_size": 1},
                                                           value_head=True)
    data: DataConfig = offline.data_group(offline.NOT_READ_BY_PAIRS, defaults={"max_len": 512})


def parse_args(argv=None) -> RMJob:
    return offline.parse_offline(RMJob, argv, __doc__, value_head=True)


def train(job: RMJob) -> list[dict]:
    from engine.data.preference import PreferenceDataset
    from engine.trainers.rm import RewardModelTrainer

    tokenizer, train_set, eval_set = offline.load_splits(PreferenceDataset, job)
    trainer = RewardModelTrainer(job.trainer, train_set, eval_set, pad_token_id=offline.pad_token_id(tokenizer),
                                 rm=job.rm, packing_samples=job.data.packing_samples)
    return trainer.fit()


def main(argv=None) -> None:
    offline.launch(train, parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
