"""The built-in agent environments learn: short GRPO runs through the real loop (Ray, a vLLM engine,
a Megatron actor, the multi-turn executor) from a tiny model warm-started on a mix of a good and a
worse behaviour, so the RL signal is in the choice between them:

- calculator_tool: the warm start calls ``calc`` on 30 % of the prompts and answers the rest at
  once (reward 1 for a right answer after the tool, 0.5 without), so the reward and the tool-use
  rate (agent/tool_use, logged per rollout) rise;
- guess_number: the warm start bisects in 30 % of its games and scans upward from 1 in the rest,
  so the mean turns to success (agent/turns over found games) fall.

One SFT (both tasks' demonstrations, different prompts) serves both runs.
"""
from __future__ import annotations

import pytest

from tests.rl_harness import MARGIN, sft_on_task


@pytest.fixture(scope="module")
def agent_setup(tmp_path_factory):
    from engine.cli import demo
    from engine.tasks import calculator_tool, guess_number
    from engine.tasks.arithmetic import write_jsonl
    from models.tiny import EOS

    root = tmp_path_factory.mktemp("agents")
    model = demo._tiny_model(root)
    calculator, guess, sft = root / "calculator", root / "guess", root / "sft_data"
    # Factors 2-5: the tiny model learns the 16 products in a short SFT, so the answer is right
    # either way and the tool's reward (1 against 0.5) is what GRPO sees.
    calc_rows = calculator_tool.make_rows(512, high=5, seed=0)
    guess_rows = guess_number.make_rows(128, seed=0)
    write_jsonl(calculator_tool.sft_rows(calc_rows, eos=EOS, tool_use=0.3, seed=0)
                + guess_number.sft_rows(guess_rows, eos=EOS, bisect=0.3, seed=0), sft / "train.jsonl")
    write_jsonl(calculator_tool.make_rows(512, high=5, seed=1), calculator / "train.jsonl")
    write_jsonl(guess_number.make_rows(512, seed=1), guess / "train.jsonl")
    return {"model": sft_on_task(model, f"json@{sft}", root / "sft", max_len=64), "root": root,
            "calculator": f"json@{calculator}", "guess": f"json@{guess}"}


def _grpo(setup, name: str, *extra: str) -> list[dict]:
    from engine.cli import train_ppo_ray

    return train_ppo_ray.main([
        "--run_dir", str(setup["root"] / f"run_{name}"), "--pretrain", setup["model"],
        "--input_key", "prompt", "--label_key", "label", "--advantage_estimator", "grpo", "--init_kl_coef", "0",
        "--n_samples_per_prompt", "8", "--rollout_batch_size", "16", "--train_batch_size", "64",
        "--micro_train_batch_size", "32", "--micro_rollout_batch_size", "64",
        "--learning_rate", "5e-4", "--lr_warmup_ratio", "0", "--lr_scheduler", "constant",
        "--enforce_eager", "--vllm_dtype", "float32", "--seed", "7", *extra,
    ])


def _rise(history: list[dict], key: str) -> float:
    values = [h[key] for h in history]
    return sum(values[-3:]) / 3 - sum(values[:3]) / 3


def test_calculator_reward_and_tool_use_rise(agent_setup, ray_cluster):
    history = _grpo(agent_setup, "calculator", "--prompt_data", agent_setup["calculator"],
                    "--agent_task", "calculator_tool", "--max_turns", "2", "--max_len", "40",
                    "--generate_max_len", "10", "--max_steps", "8")
    assert len(history) == 8
    log = [(round(h["reward"], 3), round(h["agent/tool_use"], 3)) for h in history]
    assert history[0]["agent/tool_use"] < 0.6, log  # the warm start leaves room to rise
    assert _rise(history, "reward") >= MARGIN, log
    assert _rise(history, "agent/tool_use") >= MARGIN, log


def test_guessing_game_turns_fall(agent_setup, ray_cluster):
    history = _grpo(agent_setup, "guess", "--prompt_data", agent_setup["guess"],
                    "--agent_task", "guess_number", "--max_turns", "9", "--max_len", "64",
                    "--generate_max_len", "3", "--max_steps", "8")
    assert len(history) == 8
    log = [(round(h["reward"], 3), round(h["agent/turns"], 3), round(h["agent/found"], 3)) for h in history]
    assert -_rise(history, "agent/turns") >= 3 * MARGIN, log
    assert _rise(history, "reward") >= MARGIN, log
