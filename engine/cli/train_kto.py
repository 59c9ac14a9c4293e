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

from dataclasses import dataclass

from engine.cli import offline
from engine.cli.options import group, run_cli
from engine.data.config import OPENRLHF_INPUT_TEMPLATE, DataConfig
from engine.trainers.config import KTOConfig, OfflineTrainerConfig


@dataclass(kw_only=True)
class KTOJob(offline.OfflineJob):
    launch: offline.LaunchOptions = offline.launch_group()
    kto: KTOConfig = group(title="KTO", factory=KTOConfig)
    trainer: OfflineTrainerConfig = offline.trainer_group(1e-5, job="kto")
    data: DataConfig = offline.data_group(offline.NOT_READ_BY_UNPAIRED)


def parse_args(argv=None) -> KTOJob:
    return offline.parse_offline(KTOJob, argv, __doc__, input_template=OPENRLHF_INPUT_TEMPLATE)


def train(job: KTOJob) -> list[dict]:
    from engine.data.preference import UnpairedPreferenceDataset
    from engine.trainers.kto import KTOTrainer

    tokenizer, train_set, eval_set = offline.load_splits(UnpairedPreferenceDataset, job)
    trainer = KTOTrainer(job.trainer, train_set, eval_set, kto=job.kto, pad_token_id=offline.pad_token_id(tokenizer),
                         max_len=job.data.max_len, packing_samples=job.data.packing_samples)
    return trainer.fit()


def main(argv=None) -> None:
    job = parse_args(argv)
    if job.data.label_key is None:
        raise SystemExit("--label_key is required: the column saying whether a completion is desirable")
    offline.launch(train, job)


if __name__ == "__main__":
    run_cli(main)
