"""DPO and KTO with LoRA: the reference is the policy's own base with the adapters off (no second
copy of the weights), and its log-probs equal those of the base model loaded on its own, after
training too; DPO learns the tiny preference set; an RM trains its adapters and its value head."""
from __future__ import annotations

import math

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.test_preference_trainers import _config, _pair_sets, model_path, pair_data, unpaired_data  # noqa: F401 - fixtures

LORA = {"lora_rank": 8, "lora_alpha": 16}


def _dpo(rank, world_size, model_dir, data_dir, layout):
    from engine.runtime.engine import AdaptersOff, TrainingEngine
    from engine.trainers.dpo import DPOConfig, DPOTrainer
    from engine.trainers.sequence_outputs import sequence_log_probs
    from models.lora import LoraConfig

    tokenizer, train_set, eval_set = _pair_sets(model_dir, data_dir)
    loop = {"train_batch_size": 16, "micro_train_batch_size": 4, "max_epochs": 3}
    config = _config(model_dir, layout, lr=5e-3, loop=loop, build={"lora": LoraConfig(**LORA)})
    trainer = DPOTrainer(config, train_set, eval_set, dpo=DPOConfig(beta=0.1), pad_token_id=tokenizer.pad_token_id)
    assert isinstance(trainer.reference, AdaptersOff)
    history = trainer.fit()
    base = _config(model_dir, layout, lr=5e-3, loop=loop).engine
    standalone = TrainingEngine(base, trainable=False, ctx=trainer.engine.ctx)
    microbatches = trainer.make_microbatches([eval_set[i] for i in range(8)])

    def log_probs(out, batch):
        return sequence_log_probs(out, batch, cp_group=None)[0]

    reference = trainer.reference.forward_outputs(microbatches, log_probs)
    expected = standalone.forward_outputs(microbatches, log_probs)
    policy = trainer.engine.forward_outputs(microbatches, log_probs)
    return {"history": history, "eval": trainer.eval_history[-1], "reference": reference, "expected": expected,
            "policy": policy}


@pytest.mark.parametrize("layout,world_size", [({}, 1), ({"tensor_model_parallel_size": 2}, 2)], ids=["tp1", "tp2"])
def test_dpo_reference_is_the_base_and_lora_learns(layout, world_size, model_path, pair_data):  # noqa: F811
    result = run_distributed(_dpo, world_size, args=(model_path, pair_data, layout), timeout=300)[0]
    for reference, expected, policy in zip(result["reference"], result["expected"], result["policy"]):
        torch.testing.assert_close(reference, expected, atol=1e-5, rtol=0)
        assert (policy - reference).abs().max() > 1e-2  # the adapters trained: the policy moved away
    history, evaluation = result["history"], result["eval"]
    assert abs(history[0]["loss"] - math.log(2)) < 1e-5  # B starts at zero: policy == reference
    assert evaluation["loss"] < history[0]["loss"] and evaluation["acc"] > 0.8, evaluation


def _rm(rank, world_size, model_dir, data_dir, save_path):
    from engine.trainers.rm import RewardModelTrainer
    from models.lora import LoraConfig, is_lora_name

    tokenizer, train_set, eval_set = _pair_sets(model_dir, data_dir)
    loop = {"train_batch_size": 16, "micro_train_batch_size": 4, "max_epochs": 2}
    config = _config(model_dir, {"tensor_model_parallel_size": 2}, lr=5e-3, loop=loop, value_head=True,
                     save_path=save_path, build={"lora": LoraConfig(**LORA)})
    trainer = RewardModelTrainer(config, train_set, eval_set, pad_token_id=tokenizer.pad_token_id)
    head_before = trainer.engine.model.output_layer.weight.detach().clone()
    history = trainer.fit()
    trained = sorted(n for n, p in trainer.engine.model.named_parameters() if p.requires_grad and not is_lora_name(n))
    head_moved = not torch.equal(head_before, trainer.engine.model.output_layer.weight)
    return {"history": history, "eval": trainer.eval_history[-1], "trained": trained, "head_moved": head_moved}


def test_lora_rm_trains_adapters_and_value_head(model_path, pair_data, tmp_path):  # noqa: F811
    save_path = tmp_path / "rm_adapter"
    result = run_distributed(_rm, 2, args=(model_path, pair_data, str(save_path)), timeout=300)[0]
    assert result["trained"] == ["output_layer.weight"] and result["head_moved"]
    assert result["eval"]["acc"] > 0.8 and result["eval"]["loss"] < result["history"][0]["loss"]
    config = (save_path / "adapter_config.json").read_text()
    assert '"SEQ_CLS"' in config and '"score"' in config


def _kto(rank, world_size, model_dir, data_dir):
    from transformers import AutoTokenizer

    from engine.data.config import DataConfig
    from engine.data.preference import UnpairedPreferenceDataset
    from engine.runtime.engine import AdaptersOff
    from engine.trainers.kto import KTOConfig, KTOTrainer
    from models.lora import LoraConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = DataConfig(dataset=f"json@{data_dir}", input_key="prompt", output_key="completion", label_key="label",
                      input_template="Q: {}\nA: ", max_len=32)
    loop = {"train_batch_size": 16, "micro_train_batch_size": 4, "max_epochs": 2}
    trainer = KTOTrainer(_config(model_dir, {}, lr=5e-3, loop=loop, build={"lora": LoraConfig(**LORA)}),
                         UnpairedPreferenceDataset.from_config(data, tokenizer, split="train"),
                         kto=KTOConfig(beta=0.1), pad_token_id=tokenizer.pad_token_id, max_len=32)
    assert isinstance(trainer.reference, AdaptersOff)
    return trainer.fit()


def test_lora_kto_learns_against_its_base(model_path, unpaired_data):  # noqa: F811
    history = run_distributed(_kto, 1, args=(model_path, unpaired_data), timeout=300)[0]
    assert abs(history[0]["kl"]) < 1e-6 and abs(history[0]["loss"] - 0.5) < 1e-5  # policy == reference at start
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["signed_reward"] > 0, history[-1]
