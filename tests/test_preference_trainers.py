"""Reward model, DPO and KTO trainers on the Megatron engine.

Layouts: the loss curves under TP=2 and PP=2 (DPO also CP=2) equal the single-process curve.
Learning: on a synthetic preference set (chosen responses drawn from one word list, rejected ones
from another) RM pairwise accuracy and DPO preference accuracy on held-out pairs exceed 0.9; KTO's
loss falls and its signed implicit reward rises. The exported RM loads in HF
``AutoModelForSequenceClassification``, scores held-out pairs like the Megatron model did, and
carries the reward mean / std the trainer measured.
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest

from tests.dist_harness import run_distributed

LOSS_TOLERANCE = 2e-4  # relative; fp32 reductions differ in order between layouts
NUM_COMPARED_STEPS = 3
GOOD = "yes good right true thanks please hello great well help".split()
BAD = "no bad wrong false cause minus off low small end".split()
PROMPT_WORDS = "the a of to and in is it you that he was for on are with as his they".split()


def _rows(num_rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        prompt = " ".join(rng.choices(PROMPT_WORDS, k=rng.randint(2, 5)))
        rows.append({"prompt": prompt, "chosen": " ".join(rng.choices(GOOD, k=rng.randint(1, 4))),
                     "rejected": " ".join(rng.choices(BAD, k=rng.randint(1, 4)))})
    return rows


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    from models.tiny import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("pref_model") / "llama", seed=0)


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("pairs")
    for split, num_rows, seed in (("train", 128, 0), ("test", 32, 1)):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(num_rows, seed)))
    return str(directory)


@pytest.fixture(scope="module")
def unpaired_data(tmp_path_factory) -> str:
    """KTO rows: each pair split into a desirable and an undesirable completion."""
    directory = tmp_path_factory.mktemp("unpaired")
    rows = []
    for row in _rows(64, 2):
        rows.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        rows.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    random.Random(0).shuffle(rows)
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(directory)


def _config(model_path, layout, *, lr, loop, value_head=False, save_path=None, build=None):
    from engine.runtime.engine import EngineConfig
    from engine.runtime.optimizer import OptimConfig
    from engine.trainers.base import OfflineTrainerConfig, TrainLoopConfig
    from models.builder import ModelBuildConfig
    from parallel.config import ParallelConfig

    return OfflineTrainerConfig(
        engine=EngineConfig(pretrain=model_path, parallel=ParallelConfig(**layout),
                            optim=OptimConfig(learning_rate=lr, lr_warmup_ratio=0.0, lr_scheduler="constant"),
                            build=ModelBuildConfig(value_head=value_head, **(build or {}))),
        loop=TrainLoopConfig(**loop, save_path=save_path),
    )


def _pair_sets(model_path, data_dir):
    from transformers import AutoTokenizer

    from engine.data.config import DataConfig
    from engine.data.preference import PreferenceDataset

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = DataConfig(dataset=f"json@{data_dir}", prompt_key="prompt", input_template="Q: {}\nA: ", max_len=32)
    return (tokenizer, PreferenceDataset.from_config(data, tokenizer, split="train"),
            PreferenceDataset.from_config(data, tokenizer, split="test"))


def _train_pairs(rank, world_size, kind, model_path, data_dir, layout, loop, save_path=None, build=None,
                 packing=False):
    from engine.trainers.dpo import DPOConfig, DPOTrainer
    from engine.trainers.rm import RewardModelTrainer

    tokenizer, train_set, eval_set = _pair_sets(model_path, data_dir)
    if kind == "rm":
        config = _config(model_path, layout, lr=2e-3, loop=loop, value_head=True, save_path=save_path, build=build)
        trainer = RewardModelTrainer(config, train_set, eval_set, pad_token_id=tokenizer.pad_token_id,
                                     packing_samples=packing)
    else:
        config = _config(model_path, layout, lr=1e-3, loop=loop, save_path=save_path, build=build)
        trainer = DPOTrainer(config, train_set, eval_set, dpo=DPOConfig(beta=0.1, nll_loss_coef=0.1),
                             pad_token_id=tokenizer.pad_token_id, packing_samples=packing)
    history = trainer.fit()
    return {"history": history, "eval": trainer.eval_history[-1] if trainer.eval_history else None}


LEARN_LOOP = {"train_batch_size": 16, "micro_train_batch_size": 4, "max_epochs": 2}


def _pairs(kind, model_path, data_dir, layout=None, world_size=1, *, max_steps=None, save_path=None, build=None,
           packing=False):
    loop = {**LEARN_LOOP, "max_steps": max_steps}
    args = (kind, model_path, data_dir, layout or {}, loop, save_path, build, packing)
    return run_distributed(_train_pairs, world_size, args=args, timeout=400)[0]


def _assert_same_curve(actual: list[dict], expected: list[dict], key: str = "loss") -> None:
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        assert abs(a[key] - e[key]) <= LOSS_TOLERANCE * abs(e[key]) + 1e-6, f"{key} step {step}: {a[key]} vs {e[key]}"


@pytest.fixture(scope="module")
def rm_run(model_path, pair_data, tmp_path_factory) -> dict:
    save_path = tmp_path_factory.mktemp("rm_out") / "rm"
    return {**_pairs("rm", model_path, pair_data, save_path=str(save_path)), "save_path": str(save_path)}


@pytest.fixture(scope="module")
def dpo_run(model_path, pair_data) -> dict:
    return _pairs("dpo", model_path, pair_data)


# --------------------------------------------------------------------------------- reward model

def test_rm_learns_the_preference(rm_run):
    history, evaluation = rm_run["history"], rm_run["eval"]
    assert history[0]["acc"] < 0.8, history[0]
    assert evaluation["acc"] > 0.9, evaluation
    assert evaluation["loss"] < 0.5 < history[0]["loss"], (history[0], evaluation)
    assert evaluation["chosen_reward"] > evaluation["reject_reward"]


@pytest.mark.parametrize("layout", [{"tensor_model_parallel_size": 2}, {"pipeline_model_parallel_size": 2}],
                         ids=["tp2", "pp2"])
def test_rm_layouts_match_single_process(layout, rm_run, model_path, pair_data):
    result = _pairs("rm", model_path, pair_data, layout, 2, max_steps=NUM_COMPARED_STEPS)
    _assert_same_curve(result["history"], rm_run["history"][:NUM_COMPARED_STEPS])
    _assert_same_curve(result["history"], rm_run["history"][:NUM_COMPARED_STEPS], key="acc")


def test_exported_rm_scores_like_megatron_in_hf(rm_run, model_path, pair_data):
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(rm_run["save_path"]).eval()
    _, _, eval_set = _pair_sets(model_path, pair_data)
    with torch.no_grad():
        scores = [[model(input_ids=torch.tensor([s[key]])).logits[0, 0].item() for key in ("chosen_ids", "rejected_ids")]
                  for s in eval_set]
    accuracy = sum(c > r for c, r in scores) / len(scores)
    assert abs(accuracy - rm_run["eval"]["acc"]) < 1e-6
    rewards = torch.tensor([x for pair in scores for x in pair], dtype=torch.float64)
    assert abs(sum(c for c, _ in scores) / len(scores) - rm_run["eval"]["chosen_reward"]) < 1e-4
    # The reward statistics in config.json are the Megatron model's over the eval split.
    assert abs(model.config.mean - rewards.mean().item()) < 1e-4
    assert abs(model.config.std - rewards.std(unbiased=True).item()) < 1e-4  # OpenRLHF saves the unbiased std


# ------------------------------------------------------------------------------------------ DPO

def test_dpo_learns_the_preference(dpo_run):
    history, evaluation = dpo_run["history"], dpo_run["eval"]
    assert history[0]["acc"] == 0.0 and abs(history[0]["loss"] - math.log(2)) < 1e-5  # policy == reference
    assert evaluation["acc"] > 0.9, evaluation
    assert evaluation["loss"] < 0.6, evaluation
    assert evaluation["chosen_reward"] > 0 > evaluation["reject_reward"], evaluation


@pytest.mark.parametrize("layout", [{"tensor_model_parallel_size": 2}, {"pipeline_model_parallel_size": 2},
                                    {"context_parallel_size": 2}], ids=["tp2", "pp2", "cp2"])
def test_dpo_layouts_match_single_process(layout, dpo_run, model_path, pair_data):
    result = _pairs("dpo", model_path, pair_data, layout, 2, max_steps=NUM_COMPARED_STEPS)
    for key in ("loss", "nll", "chosen_reward"):
        _assert_same_curve(result["history"], dpo_run["history"][:NUM_COMPARED_STEPS], key=key)


@pytest.mark.parametrize("kind,keys", [("dpo", ("loss", "nll", "chosen_reward")), ("rm", ("loss", "acc"))])
def test_mixtral_with_expert_parallelism_matches_one_process(kind, keys, tiny_models, pair_data):
    """DPO: the policy's forward over chosen + rejected rows carries the HF aux loss (the reference
    does not train); RM: a value head on the MoE model."""
    path, build = tiny_models["mixtral"], {"aux_loss_coef": 0.05}
    single = _pairs(kind, path, pair_data, max_steps=NUM_COMPARED_STEPS, build=build)
    ep2 = _pairs(kind, path, pair_data, {"expert_model_parallel_size": 2}, 2, max_steps=NUM_COMPARED_STEPS, build=build)
    for key in (*keys, "aux_loss"):
        _assert_same_curve(ep2["history"], single["history"], key=key)
    assert all(h["aux_loss"] > 0 for h in single["history"])


@pytest.mark.parametrize("kind", ["rm", "dpo"])
@pytest.mark.parametrize("layout", [{"tensor_model_parallel_size": 2}, {"pipeline_model_parallel_size": 2},
                                    {"context_parallel_size": 2}], ids=["tp2", "pp2", "cp2"])
def test_packed_pairs_train_like_padded_ones(kind, layout, rm_run, dpo_run, model_path, pair_data):
    """--packing_samples: the 2B sequences of a micro-batch in one packed row; losses, gradient norms
    and metrics step by step as the padded single-process run."""
    reference = (rm_run if kind == "rm" else dpo_run)["history"][:NUM_COMPARED_STEPS]
    packed = _pairs(kind, model_path, pair_data, layout, 2, max_steps=NUM_COMPARED_STEPS, packing=True)
    # DPO's accuracy is left out: at step 1 policy == reference, every pair ties and the rounding decides.
    for key in ("loss", "grad_norm", "chosen_reward") if kind == "dpo" else ("loss", "grad_norm", "acc"):
        _assert_same_curve(packed["history"], reference, key=key)


def test_dpo_config_errors_name_the_flag():
    from engine.trainers.dpo import DPOConfig

    with pytest.raises(ValueError, match="--beta"):
        DPOConfig(beta=0)
    with pytest.raises(ValueError, match="--label_smoothing"):
        DPOConfig(ipo=True, label_smoothing=0.1)


# ------------------------------------------------------------------------------------------ KTO

def _train_kto(rank, world_size, model_path, data_dir, layout, max_steps, packing=False):
    from transformers import AutoTokenizer

    from engine.data.config import DataConfig
    from engine.data.preference import UnpairedPreferenceDataset
    from engine.trainers.kto import KTOConfig, KTOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = DataConfig(dataset=f"json@{data_dir}", input_key="prompt", output_key="completion", label_key="label",
                      input_template="Q: {}\nA: ", max_len=32)
    loop = {"train_batch_size": 16, "micro_train_batch_size": 4, "max_epochs": 2, "max_steps": max_steps}
    trainer = KTOTrainer(_config(model_path, layout, lr=2e-3, loop=loop),
                         UnpairedPreferenceDataset.from_config(data, tokenizer, split="train"),
                         kto=KTOConfig(beta=0.1), pad_token_id=tokenizer.pad_token_id, max_len=32,
                         packing_samples=packing)
    return trainer.fit()


def test_kto_learns_and_tp2_matches(model_path, unpaired_data):
    reference = run_distributed(_train_kto, 1, args=(model_path, unpaired_data, {}, None), timeout=400)[0]
    assert abs(reference[0]["kl"]) < 1e-6 and abs(reference[0]["loss"] - 0.5) < 1e-5  # policy == reference
    assert reference[-1]["loss"] < 0.45, reference[-1]
    assert reference[-1]["signed_reward"] > 0.5, reference[-1]
    tp2 = run_distributed(_train_kto, 2, args=(model_path, unpaired_data, {"tensor_model_parallel_size": 2},
                                               NUM_COMPARED_STEPS), timeout=400)[0]
    for key in ("loss", "signed_reward", "kl"):
        _assert_same_curve(tp2, reference[:NUM_COMPARED_STEPS], key=key)
    # --packing_samples: each micro-batch's sequences (and its mismatched KL ones) packed into one row.
    for layout in ({"tensor_model_parallel_size": 2}, {"pipeline_model_parallel_size": 2}, {"context_parallel_size": 2}):
        packed = run_distributed(_train_kto, 2, args=(model_path, unpaired_data, layout, NUM_COMPARED_STEPS, True),
                                 timeout=400)[0]
        for key in ("loss", "signed_reward", "kl", "grad_norm"):
            _assert_same_curve(packed, reference[:NUM_COMPARED_STEPS], key=key)


# ------------------------------------------------------------------------------------------ CLIs

def test_train_rm_cli_exports_a_sequence_classifier_with_reward_statistics(model_path, pair_data, tmp_path):
    out = tmp_path / "rm"
    subprocess.run([sys.executable, "-m", "engine.cli.train_rm", "--pretrain", model_path,
                    "--dataset", f"json@{pair_data}", "--prompt_key", "prompt", "--input_template", "Q: {}\nA: ",
                    "--eval_split", "test", "--max_len", "32", "--train_batch_size", "16",
                    "--micro_train_batch_size", "4", "--max_steps", "2", "--save_path", str(out)],
                   check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["LlamaForSequenceClassification"] and config.num_labels == 1
    assert math.isfinite(config.mean) and config.std > 0


def test_kto_cli_names_the_missing_label_flag(model_path, unpaired_data):
    from engine.cli import train_kto

    with pytest.raises(SystemExit, match="--label_key"):
        train_kto.main(["--pretrain", model_path, "--dataset", unpaired_data, "--input_key", "prompt"])
