"""Evaluation during RL (--eval_dataset, --eval_steps, --eval_n_samples_per_prompt,
--eval_temperature): when it runs, and pass@k against a direct count. The end-to-end run with
real vLLM engines is in tests/test_ppo_e2e.py (test_grpo_reward_rises_with_tp2_actor)."""
from __future__ import annotations

import random

import pytest

from engine.rl.evaluation import RLEvalConfig, eval_metrics, pass_at_k


def test_evaluation_runs_at_the_stated_steps_and_after_the_last():
    every_4 = RLEvalConfig(eval_dataset="e.jsonl", eval_steps=4)
    assert [s for s in range(1, 11) if every_4.due(s, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if RLEvalConfig(eval_dataset="e.jsonl").due(s, 10)] == [10]
    assert not any(RLEvalConfig(eval_steps=2).due(s, 10) for s in range(1, 11))  # no --eval_dataset
    for bad in ({"eval_steps": 0}, {"eval_n_samples_per_prompt": 0}, {"eval_temperature": -1.0}):
        with pytest.raises(ValueError, match=f"--{next(iter(bad))}"):
            RLEvalConfig(**bad)


def test_pass_at_k_equals_a_direct_count():
    rng = random.Random(0)
    for k in (1, 2, 4, 8):
        rewards = [rng.choice([0.0, 0.0, 1.0, -0.5]) for _ in range(12 * k)]
        solved = sum(1 for p in range(12) if max(rewards[p * k:(p + 1) * k]) > 0)
        assert pass_at_k(rewards, k) == solved / 12
        metrics = eval_metrics(rewards, [3] * len(rewards), k)
        assert metrics[f"eval/pass@{k}"] == solved / 12
        assert metrics["eval/pass@1"] == sum(r > 0 for r in rewards) / len(rewards)
        assert metrics["eval/reward"] == pytest.approx(sum(rewards) / len(rewards))
    with pytest.raises(ValueError, match="whole groups"):
        pass_at_k([1.0, 0.0, 1.0], 2)


def test_run_record_keeps_every_rollout_and_plots_the_reward(tmp_path):
    import json

    from PIL import Image

    from engine.rl.console import RunRecord

    record = RunRecord(tmp_path / "run")
    history = [{"step": s, "reward": s / 10, **({"eval/reward": s / 5} if s % 2 == 0 else {})} for s in range(1, 7)]
    for h in history:
        record.add({**h, "note": "x", "skipped": [1, 2]})
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["reward"] for line in lines] == [h["reward"] for h in history] and "skipped" not in lines[0]
    record.plot(history)
    image = Image.open(tmp_path / "run" / "reward.png").convert("RGB")
    colours = {image.getpixel((x, y)) for x in range(0, 640, 2) for y in range(0, 400, 2)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # both series drawn


def test_metric_lines_go_above_the_progress_bar(capsys):
    from engine.rl.console import RolloutProgress

    progress = RolloutProgress(total=2)
    progress.write("rollout 1/2 reward=0.5")
    progress.advance()
    progress.close()
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).replace("\r", "\n").splitlines()
    assert "rollout 1/2 reward=0.5" in lines  # a line of its own, not inside the bar's
    assert any(line.startswith("rollouts:") and "1/2" in line for line in lines)  # the bar moved on
