"""The RL runs' shared set-up: a tiny model supervised-fine-tuned on two-number addition (answers
are numbers), a reward for answers that start with the digit 1 (a behaviour the SFT model shows
about half of the time and GRPO / PPO push up within a few rollouts), and the common flags.

``rl_setup`` (a fixture of every test module: tests/conftest.py registers this one) gives each
module a directory of its own for its runs, over one SFT model per test session: ``rl_task``
prepares it once, the first xdist worker to need it building it under a file lock and the other
one reading it (the SFT is deterministic: every module trains from the same weights either way).
The RL end-to-end modules (tests/test_ppo_e2e*.py) run on the two xdist workers side by side.
"""
from __future__ import annotations

import itertools
import os

import pytest

REWARD_FUNC = '''
def reward_func(prompts, responses, labels):
    return [1.0 if r.strip().startswith("1") else 0.0 for r in responses]
'''
MARGIN = 0.15  # mean reward of the last 3 rollouts over the first 3


@pytest.fixture(scope="session")
def rl_task(tmp_path_factory) -> dict:
    """The addition prompts and the SFT model, built once per test session (under xdist: once for
    both workers, in the session's shared temporary directory)."""
    from filelock import FileLock

    from engine.cli import demo

    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    base = tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.getbasetemp()
    root = base / "rl_task"
    with FileLock(str(base / "rl_task.lock")):
        if not (root / "done").exists():
            root.mkdir(exist_ok=True)
            model, data = demo.prepare(root)
            sft_on_task(model, f"json@{data}", root / "sft")
            (root / "done").write_text("")
    return {"model": str(root / "sft"), "prompts": f"json@{root / 'addition'}"}


@pytest.fixture(scope="module")
def rl_setup(rl_task, tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    reward = root / "starts_with_one.py"
    reward.write_text(REWARD_FUNC)
    return {**rl_task, "reward": str(reward), "root": root}


def sft_on_task(pretrain: str, prompts: str, out, *, max_len: int = 32) -> str:
    """``pretrain`` supervised-fine-tuned on a task's ``{"prompt", "answer"}`` rows (``prompts``; the
    addition task here), saved to ``out``."""
    from engine.cli import train_sft

    train_sft.main([
        "--pretrain", pretrain, "--dataset", prompts, "--input_key", "prompt", "--output_key", "answer",
        "--input_template", "",  # RL prompts are the raw "3+4=" (train_sft's default template is OpenRLHF's)
        "--max_len", str(max_len), "--train_batch_size", "64", "--micro_train_batch_size", "32", "--max_epochs", "4",
        "--learning_rate", "3e-3", "--lr_warmup_ratio", "0.05", "--logging_steps", "100", "--save_path", str(out),
    ])
    return str(out)


RUNS = itertools.count()


def ppo_args(setup, *extra: str) -> list[str]:
    return [
        "--run_dir", str(setup["root"] / f"run{next(RUNS)}"),
        "--pretrain", setup["model"], "--prompt_data", setup["prompts"], "--input_key", "prompt",
        "--label_key", "label", "--remote_rm_url", setup["reward"],
        "--n_samples_per_prompt", "8", "--rollout_batch_size", "16", "--train_batch_size", "64",
        "--micro_train_batch_size", "32", "--micro_rollout_batch_size", "64", "--generate_max_len", "6",
        "--learning_rate", "2e-4", "--lr_warmup_ratio", "0", "--lr_scheduler", "constant",
        "--enforce_eager", "--vllm_dtype", "float32", "--seed", "7", *extra,
    ]


def rise(history: list[dict], key: str = "reward") -> float:
    values = [h[key] for h in history]
    return sum(values[-3:]) / 3 - sum(values[:3]) / 3


def eval_prompts(setup, count: int = 8) -> str:
    """The first ``count`` rows of the held-out addition split as the eval prompt file."""
    from pathlib import Path

    held_out = Path(setup["prompts"].split("@", 1)[1]) / "test.jsonl"
    path = setup["root"] / "eval_prompts.jsonl"
    path.write_text("".join(held_out.read_text().splitlines(keepends=True)[:count]))
    return str(path)
