"""DPO / IPO / cDPO on Megatron-core (OpenRLHF's train_dpo flags).

    torchrun --nproc_per_node 2 -m engine.cli.train_dpo --pretrain SFT_HF [--ref_pretrain REF_HF] \\
        --dataset prefs.jsonl --prompt_key prompt --chosen_key chosen --rejected_key rejected \\
        --beta 0.1 [--ipo | --label_smoothing 0.1] [--nll_loss_coef 0.2] [--ref_offload] \\
        --tensor_model_parallel_size 2 --train_batch_size 64 --micro_train_batch_size 2 --save_path out/dpo

The reference (default: the policy's start) is a frozen Megatron model on the same grid.
Without torchrun, ``--nproc_per_node N`` spawns N local ranks itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.cli import offline
from engine.cli.options import group, run_cli
from engine.data.config import DataConfig
from engine.trainers.config import DPOConfig, OfflineTrainerConfig


@dataclass(kw_only=True)
class DPOJob(offline.OfflineJob):
    launch: offline.LaunchOptions = offline.launch_group()
    dpo: DPOConfig = group(title="DPO", factory=DPOConfig)
    trainer: OfflineTrainerConfig = offline.trainer_group(1e-5, job="dpo")
    data: DataConfig = offline.data_group(offline.NOT_READ_BY_PAIRS, defaults={"max_len": 512})


def parse_args(argv=None) -> DPOJob:
    return offline.parse_offline(DPOJob, argv, __doc__)


def train(job: DPOJob) -> list[dict]:
    from engine.data.preference import PreferenceDataset
    from engine.trainers.dpo import DPOTrainer

    tokenizer, train_set, eval_set = offline.load_splits(PreferenceDataset, job)
    trainer = DPOTrainer(job.trainer, train_set, eval_set, dpo=job.dpo, pad_token_id=offline.pad_token_id(tokenizer),
                         packing_samples=job.data.packing_samples)
    return trainer.fit()


def main(argv=None) -> None:
    offline.launch(train, parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
