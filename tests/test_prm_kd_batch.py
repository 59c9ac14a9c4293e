"""KD and PRM trainers on the Megatron engine, and batch inference (generate / rm / best-of-n).

KD: the loss curve under TP=2 equals TP=1, and a teacher identical to the student's start has
KL 0 at the first step. PRM: accuracy at the placeholders rises on a learnable synthetic set.
Batch inference: one vLLM engine writes N outputs per input; reward scores equal HF's.
"""
from __future__ import annotations

import json
import random

import pytest

from tests.dist_harness import run_distributed

LOSS_TOLERANCE = 2e-4  # relative; fp32 reductions differ in order between layouts
VLLM_TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    from models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("kd_prm_models")
    return {"student": build_tiny_model("llama", root / "student", seed=0),
            "teacher": build_tiny_model("llama", root / "teacher", seed=1)}


@pytest.fixture(scope="module")
def arithmetic_data(tmp_path_factory) -> str:
    from engine.tasks.arithmetic import make_rows, write_jsonl

    directory = tmp_path_factory.mktemp("kd_data")
    write_jsonl(make_rows(64, max_operand=9, seed=0), directory / "train.jsonl")
    return str(directory)


def _engine_config(model_path, layout, lr):
    from engine.runtime.engine import EngineConfig
    from engine.runtime.optimizer import OptimConfig
    from parallel.config import ParallelConfig

    return EngineConfig(pretrain=model_path, parallel=ParallelConfig(**layout),
                        optim=OptimConfig(learning_rate=lr, lr_warmup_ratio=0.0, lr_scheduler="constant"))


# ------------------------------------------------------------------------------------------- KD

def _train_kd(rank, world_size, student, teacher, data_dir, layout, max_steps, kd_coef):
    from transformers import AutoTokenizer

    from engine.data.config import DataConfig
    from engine.data.sft import SFTDataset
    from engine.trainers.base import OfflineTrainerConfig, TrainLoopConfig
    from engine.trainers.kd import KDConfig, KDTrainer

    tokenizer = AutoTokenizer.from_pretrained(student)
    data = DataConfig(dataset=f"json@{data_dir}", input_key="prompt", output_key="answer", max_len=32)
    config = OfflineTrainerConfig(
        engine=_engine_config(student, layout, 1e-3),
        loop=TrainLoopConfig(train_batch_size=16, micro_train_batch_size=4, max_steps=max_steps),
    )
    trainer = KDTrainer(config, SFTDataset.from_config(data, tokenizer, split="train"),
                        kd=KDConfig(teacher_model=teacher, kd_coef=kd_coef), pad_token_id=tokenizer.pad_token_id)
    return trainer.fit()


def _kd(models, data, layout, world_size, *, teacher="teacher", max_steps=3, kd_coef=0.5):
    args = (models["student"], models[teacher], data, layout, max_steps, kd_coef)
    return run_distributed(_train_kd, world_size, args=args, timeout=300)[0]


def test_kd_loss_curve_tp2_matches_tp1(models, arithmetic_data):
    reference = _kd(models, arithmetic_data, {}, 1)
    tp2 = _kd(models, arithmetic_data, {"tensor_model_parallel_size": 2}, 2)
    for key in ("loss", "nll", "kd", "kl"):
        for step, (a, e) in enumerate(zip([h[key] for h in tp2], [h[key] for h in reference]), start=1):
            assert abs(a - e) <= LOSS_TOLERANCE * abs(e) + 1e-6, f"{key} step {step}: {a} vs {e}"
    assert reference[0]["kl"] > 1e-3  # a different random teacher differs from the student (tiny inits are near-uniform)
    assert reference[-1]["loss"] < reference[0]["loss"]


def test_kd_teacher_equal_to_student_has_zero_kl(models, arithmetic_data):
    history = _kd(models, arithmetic_data, {}, 1, teacher="student", max_steps=1)
    assert abs(history[0]["kl"]) < 1e-5, history[0]
    # The distillation cross-entropy is then the student's own entropy.
    assert history[0]["kd"] > 1.0


# ------------------------------------------------------------------------------------------ PRM

@pytest.fixture(scope="module")
def prm_data(tmp_path_factory) -> str:
    """Steps of random words ending in "yes" (label "+") or "no" (label "-"), "?" after each step."""
    words = "the a of to and in is it you that he was for on are with as his they".split()
    rng = random.Random(0)
    directory = tmp_path_factory.mktemp("prm_data")
    for split, num_rows in (("train", 256), ("test", 32)):
        with open(directory / f"{split}.jsonl", "w") as f:
            for _ in range(num_rows):
                good = [rng.random() < 0.5 for _ in range(rng.randint(2, 4))]
                steps = [" ".join(rng.choices(words, k=3)) + (" yes" if g else " no") for g in good]
                f.write(json.dumps({"steps": steps, "labels": ["+" if g else "-" for g in good]}) + "\n")
    return str(directory)


def _train_prm(rank, world_size, model_path, data_dir, layout, packing=False, max_steps=None):
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
    config = OfflineTrainerConfig(
        engine=_engine_config(model_path, layout, 3e-3),
        loop=TrainLoopConfig(train_batch_size=32, micro_train_batch_size=8, max_epochs=2, max_steps=max_steps),
    )
    trainer = PRMTrainer(config, train_set, eval_set, pad_token_id=tokenizer.pad_token_id,
                         reward_token_ids=list(train_set.reward_token_ids.values()), packing_samples=packing)
    history = trainer.fit()
    return {"history": history, "eval": trainer._evaluate(trainer.last_step)}


def test_prm_accuracy_rises(models, prm_data):
    result = run_distributed(_train_prm, 2, args=(models["student"], prm_data, {"tensor_model_parallel_size": 2}),
                             timeout=300)[0]
    accuracy = [h["acc"] for h in result["history"]]
    assert sum(accuracy[:2]) / 2 < 0.8, accuracy
    assert result["eval"]["acc"] > 0.95, (accuracy, result["eval"])
    assert result["eval"]["loss"] < result["history"][0]["loss"]
    # --packing_samples: each micro-batch's samples in one row; the same curve at TP=2 and PP=2.
    for layout in ({"tensor_model_parallel_size": 2}, {"pipeline_model_parallel_size": 2}, {"context_parallel_size": 2}):
        packed = run_distributed(_train_prm, 2, args=(models["student"], prm_data, layout, True, 3), timeout=300)[0]
        for step, (p, e) in enumerate(zip(packed["history"], result["history"][:3]), start=1):
            for key in ("loss", "acc", "grad_norm"):
                assert abs(p[key] - e[key]) <= 2e-4 * abs(e[key]) + 1e-6, (layout, step, key, p[key], e[key])


# ------------------------------------------------------------------------------ batch inference

@pytest.fixture(scope="module")
def inference_models(tmp_path_factory) -> dict[str, str]:
    """A vLLM-loadable tiny policy (head_dim 32) and a reward model made from it."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("inference_models")
    policy = build_tiny_model("llama", root / "policy", seed=0, **VLLM_TINY)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    rm.config.pad_token_id = 0
    rm.save_pretrained(root / "rm")
    AutoTokenizer.from_pretrained(policy).save_pretrained(root / "rm")
    return {"policy": policy, "rm": str(root / "rm")}


def test_batch_inference_generate_score_select(ray_cluster, inference_models, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from engine.cli import batch_inference
    from engine.inference.batch import conditional_sft_rows, iterative_dpo_pairs, read_jsonl

    prompts = ["Hello", "The sum of 12+30=", "reverse the word turn", "Copy: 1 2 3"]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"question": p}) + "\n" for p in prompts))
    num_samples = 3
    generated = tmp_path / "gen.jsonl"
    batch_inference.main([
        "--eval_task", "generate", "--pretrain", inference_models["policy"], "--dataset", str(tmp_path / "prompts.jsonl"),
        "--input_key", "question", "--input_template", "User: {}\nAssistant: ", "--best_of_n", str(num_samples),
        "--generate_max_len", "8", "--temperature", "1.0", "--enforce_eager", "--output_path", str(generated),
    ])
    rows = read_jsonl(generated)
    assert len(rows) == num_samples * len(prompts)
    for i, prompt in enumerate(prompts):
        group = rows[i * num_samples:(i + 1) * num_samples]
        assert all(r["input"] == f"User: {prompt}\nAssistant: " and isinstance(r["output"], str) for r in group)

    scored_path, best_path = tmp_path / "scored.jsonl", tmp_path / "best.jsonl"
    common = ["--eval_task", "rm", "--pretrain", inference_models["rm"], "--dataset", str(generated),
              "--micro_batch_size", "5"]
    scored = batch_inference.main(common + ["--output_path", str(scored_path)])
    best = batch_inference.main(common + ["--output_path", str(best_path), "--post_processor", "rs"])

    # Batched scores equal HF's pooled score of each sequence alone (input + output + eos).
    tokenizer = AutoTokenizer.from_pretrained(inference_models["rm"])
    model = AutoModelForSequenceClassification.from_pretrained(inference_models["rm"]).eval()
    for row in scored:
        ids = tokenizer(row["input"] + row["output"])["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert abs(row["reward"] - expected) < 1e-4, (row, expected)

    assert read_jsonl(best_path) == best and len(best) == len(prompts)
    for i, kept in enumerate(best):
        group = scored[i * num_samples:(i + 1) * num_samples]
        assert kept["reward"] == max(r["reward"] for r in group) and kept["input"] == group[0]["input"]

    conditioned = conditional_sft_rows(scored)
    assert conditioned[0]["input"] == f"{scored[0]['input']} <rm_score>: {round(scored[0]['reward'], 1)} "
    for pair in iterative_dpo_pairs(scored):
        group = [r for r in scored if r["input"] == pair["prompt"]]
        assert pair["chosen_reward"] == max(r["reward"] for r in group)
        assert pair["rejected_reward"] == min(r["reward"] for r in group)

    # Conditional SFT at generation, with a repetition penalty and a scheduler cap: greedy equals HF's
    # greedy with the same penalty on the conditioned prompt.
    from transformers import AutoModelForCausalLM

    from engine.data.tokens import TokenEncoder

    conditioned_path = tmp_path / "csft.jsonl"
    batch_inference.main([
        "--eval_task", "generate", "--pretrain", inference_models["policy"], "--dataset", str(tmp_path / "prompts.jsonl"),
        "--input_key", "question", "--input_template", "User: {}\nAssistant: ", "--generate_max_len", "8",
        "--temperature", "0", "--enforce_eager", "--vllm_dtype", "float32", "--enable_csft",
        "--csft_prompt", " <rm_score>: 5.00 ", "--repetition_penalty", "1.5", "--max_num_seqs", "2",
        "--output_path", str(conditioned_path),
    ])
    policy_tokenizer = AutoTokenizer.from_pretrained(inference_models["policy"])
    policy = AutoModelForCausalLM.from_pretrained(inference_models["policy"], dtype=torch.float32).eval()
    encoder = TokenEncoder(policy_tokenizer)

    def hf_greedy(text: str, penalty: float) -> str:
        ids = torch.tensor([encoder.prompt_ids(text)])
        with torch.no_grad():
            out = policy.generate(ids, max_new_tokens=8, do_sample=False, repetition_penalty=penalty,
                                  eos_token_id=policy_tokenizer.eos_token_id, pad_token_id=0)
        return policy_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    rows = read_jsonl(conditioned_path)
    for prompt, row in zip(prompts, rows):
        assert row["input"] == f"User: {prompt}\nAssistant: <rm_score>: 5.00 "
        assert row["output"] == hf_greedy(row["input"], 1.5)
    assert any(row["output"] != hf_greedy(row["input"], 1.0) for row in rows)  # the penalty changed something
