"""KD and PRM with LoRA: a teacher equal to the student's start is its base with the adapters off,
which the student (B = 0) matches exactly at the first step; both trainers learn."""
from __future__ import annotations

from dataclasses import replace

from tests.dist_harness import run_distributed
from tests.test_prm_kd_batch import _engine_config, arithmetic_data, models, prm_data  # noqa: F401 - fixtures


def _lora_engine(model_path, layout, lr):
    from models.builder import ModelBuildConfig
    from models.lora import LoraConfig

    config = _engine_config(model_path, layout, lr)
    return replace(config, build=ModelBuildConfig(lora=LoraConfig(lora_rank=8, lora_alpha=16)))


def _kd(rank, world_size, model_path, data_dir):
    from transformers import AutoTokenizer

    from engine.data.config import DataConfig
    from engine.data.sft import SFTDataset
    from engine.runtime.engine import AdaptersOff
    from engine.trainers.base import OfflineTrainerConfig, TrainLoopConfig
    from engine.trainers.kd import KDConfig, KDTrainer
    from models.lora import has_lora

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = DataConfig(dataset=f"json@{data_dir}", input_key="prompt", output_key="answer", max_len=32)
    config = OfflineTrainerConfig(engine=_lora_engine(model_path, {"tensor_model_parallel_size": 2}, 5e-3),
                                  loop=TrainLoopConfig(train_batch_size=16, micro_train_batch_size=4, max_steps=6))
    # The teacher is the student's own start: its base with the adapters off (no copy); with B = 0 the
    # first step's KL is exactly 0.
    trainer = KDTrainer(config, SFTDataset.from_config(data, tokenizer, split="train"),
                        kd=KDConfig(teacher_model=model_path, kd_coef=0.5), pad_token_id=tokenizer.pad_token_id)
    assert has_lora(trainer.engine.model) and isinstance(trainer.teacher, AdaptersOff)
    return trainer.fit()


def test_lora_kd(models, arithmetic_data):  # noqa: F811
    history = run_distributed(_kd, 2, args=(models["student"], arithmetic_data), timeout=300)[0]
    assert abs(history[0]["kl"]) < 1e-5, history[0]
    assert history[-1]["loss"] < history[0]["loss"]


def _prm(rank, world_size, model_path, data_dir):
    from transformers import AutoTokenizer

    from engine.data.config import DataConfig
    from engine.data.process_reward import ProcessRewardDataset
    from engine.trainers.base import OfflineTrainerConfig, TrainLoopConfig
    from engine.trainers.prm import PRMTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = DataConfig(dataset=f"json@{data_dir}", input_key="steps", label_key="labels", max_len=64)
    options = dict(placeholder_token="?", reward_tokens=["+", "-"])
    train_set = ProcessRewardDataset.from_config(data, tokenizer, split="train", **options)
    eval_set = ProcessRewardDataset.from_config(data, tokenizer, split="test", **options)
    config = OfflineTrainerConfig(engine=_lora_engine(model_path, {"tensor_model_parallel_size": 2}, 1e-2),
                                  loop=TrainLoopConfig(train_batch_size=32, micro_train_batch_size=8, max_epochs=2))
    trainer = PRMTrainer(config, train_set, eval_set, pad_token_id=tokenizer.pad_token_id,
                         reward_token_ids=list(train_set.reward_token_ids.values()))
    history = trainer.fit()
    return {"history": history, "eval": trainer._evaluate(trainer.last_step)}


def test_lora_prm_learns(models, prm_data):  # noqa: F811
    result = run_distributed(_prm, 2, args=(models["student"], prm_data), timeout=300)[0]
    assert result["eval"]["loss"] < result["history"][0]["loss"]
    assert result["eval"]["acc"] > 0.9, result["eval"]
