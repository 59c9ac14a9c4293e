"""The RL loop end to end on Ray: Megatron roles, a vLLM engine, weight sync every rollout.

GRPO on a TP=2 actor (the reference run), its preemption and exact resume, another rollout
backend and a multi-turn agent on the same loop (tests/rl_harness.py: the task).
"""
from __future__ import annotations

import pytest

from tests.rl_harness import MARGIN, eval_prompts, ppo_args, rise


def test_grpo_reward_rises_with_tp2_actor(rl_setup, ray_cluster):
    from engine.cli import train_ppo_ray

    history = train_ppo_ray.main(ppo_args(
        rl_setup, "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "10",
        "--actor_num_gpus_per_node", "2", "--actor_tensor_model_parallel_size", "2",
        "--ckpt_path", str(rl_setup["root"] / "ckpt_tp2"), "--save_steps", "5", "--max_ckpt_num", "2",
        "--eval_dataset", eval_prompts(rl_setup), "--eval_steps", "5", "--eval_n_samples_per_prompt", "4",
        "--run_dir", str(rl_setup["root"] / "run_tp2"),
    ))
    assert len(history) == 10
    # Evaluation at the stated rollouts only, its pass@4 consistent with its per-response pass rate.
    evaluated = [h for h in history if "eval/pass@4" in h]
    assert [h["step"] for h in evaluated] == [5, 10]
    for h in evaluated:
        assert h["eval/pass@1"] <= h["eval/pass@4"] <= min(1.0, 4 * h["eval/pass@1"])
        assert 0 < h["eval/response_length"] <= 6
    # The run directory: one metrics line per rollout, and the reward plot.
    import json

    from PIL import Image

    record = rl_setup["root"] / "run_tp2" / "metrics.jsonl"
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 11))
    assert [line["reward"] for line in lines] == pytest.approx([h["reward"] for h in history])
    assert Image.open(record.parent / "reward.png").size == (640, 400)
    assert Image.open(record.parent / "rollout.png").size == (960, 400)
    # The engine really holds the actor's weights after every sync (fp32: equal log-probs).
    assert max(h["rollout_logprob_abs_diff"] for h in history) < 1e-4
    assert rise(history) >= MARGIN, [h["reward"] for h in history]
    rl_setup["tp2_history"] = history


def test_grpo_runs_on_another_rollout_backend(rl_setup, ray_cluster):
    """The loop and the weight sync know engines only through EnginePool: a backend on HF
    ``generate`` (tests/hf_rollout_backend.py, registered here) runs GRPO, and after every sync its
    raw log-probs equal the actor's (fp32), so the weights really went through the pool."""
    from engine.cli import train_ppo_ray
    from engine.ray.rollout_backends import ROLLOUT_BACKENDS, register_rollout_backend

    register_rollout_backend("hf_generate", "tests.hf_rollout_backend:BACKEND")
    try:
        history = train_ppo_ray.main(ppo_args(
            rl_setup, "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "2",
            "--rollout_backend", "hf_generate", "--rollout_batch_size", "8", "--train_batch_size", "32",
        ))
    finally:
        ROLLOUT_BACKENDS.pop("hf_generate")
    assert len(history) == 2
    assert max(h["rollout_logprob_abs_diff"] for h in history) < 1e-4
    assert history[1]["actor/policy_loss"] == history[1]["actor/policy_loss"]  # trained on its samples
    with pytest.raises(ValueError, match="--rollout_backend 'sglang' is not known; known: .*vllm"):
        train_ppo_ray.parse_args(ppo_args(rl_setup, "--rollout_backend", "sglang"))


def test_openrlhf_agent_file_runs_multi_turn_grpo_on_the_engine(rl_setup, ray_cluster):
    """OpenRLHF's example agent (tests/test_agents.py: its import line changed) through
    --agent_func_path on the vLLM engine: trajectories of several turns whose environment tokens
    are masked, the engine's log-probs of the model's tokens equal to the actor's after each sync
    (fp32), and in each rollout one step that raises and one that passes --agent_step_timeout
    failing their own trajectories only (reward 0, counted) while the rollout completes."""
    from engine.cli import train_ppo_ray
    from tests.test_agents import write_agent_file

    agent = write_agent_file(rl_setup["root"] / "agent_func.py", fail_at=3, per_rollout=32)
    args = ppo_args(rl_setup, "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "2",
                     "--rollout_batch_size", "4", "--train_batch_size", "32", "--agent_func_path", agent,
                     "--max_turns", "3", "--max_len", "160", "--agent_step_timeout", "2")
    reward_flag = args.index("--remote_rm_url")
    del args[reward_flag:reward_flag + 2]  # the environment's rewards only
    history = train_ppo_ray.main(args)
    assert len(history) == 2
    for h in history:
        assert h["agent/failed"] == 2 and h["agent/timed_out"] == 1
        assert 1 < h["agent/turns"] <= 3  # the example ends after 1-3 steps (more turns than one)
        assert h["rollout_logprob_abs_diff"] < 1e-4  # only the model's tokens are compared, and they agree
        assert h["actor/policy_loss"] == h["actor/policy_loss"]
    # Environment tokens (the feedback text) make the rows longer than the model's turns alone.
    assert history[0]["response_length"] > 3 * history[0]["agent/turns"]


PREEMPT_GRACE_S = 90  # --preempt_grace_s of the preempted run: the stated bound of its stop


def _start_driver(args: list[str], log):
    """train_ppo_ray as its own process, in a session of its own, on a Ray instance it starts itself
    (so every process of the run descends from it)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "engine.cli.train_ppo_ray", *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _logged_steps(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _alive_in(tree: dict[int, int], pgid: int) -> dict[int, str]:
    """The processes of ``tree`` ({pid: start time}) or of process group ``pgid`` still alive."""
    import os
    from pathlib import Path

    from tests.test_process_lifetime import _alive, _cmdline, _stat

    alive = {pid: _cmdline(pid) for pid, start in tree.items() if _alive(pid, start)}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == pgid and (_stat(int(entry.name)) or "Z")[1] != "Z":
                alive[int(entry.name)] = _cmdline(int(entry.name))
        except ProcessLookupError:
            pass
    return alive


def test_sigterm_checkpoints_stops_everything_and_the_resume_continues(rl_setup, ray_cluster):
    """SIGTERM to the driver during rollout 4 (of 5): within --preempt_grace_s it has written the checkpoint of
    the rollouts it trained, every process it started (Ray, roles, engines) is gone, and it exited 143;
    the resumed run continues the uninterrupted run exactly (same rewards and losses) and logs every
    rollout once (a torn last metrics line, as a kill -9 leaves, is dropped)."""
    import json
    import os
    import signal
    import time

    from engine.cli import train_ppo_ray
    from models.mcore_checkpoint import verify_checkpoint
    from tests.test_process_lifetime import _descendants, _kill_leftovers, _stat

    reference = rl_setup.get("tp2_history")
    if reference is None:
        pytest.skip("needs the uninterrupted run of test_grpo_reward_rises_with_tp2_actor")
    ckpt, run_dir = rl_setup["root"] / "ckpt_preempt", rl_setup["root"] / "run_preempt"
    grpo = ("--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "5",
            "--actor_num_gpus_per_node", "2", "--actor_tensor_model_parallel_size", "2",
            "--ckpt_path", str(ckpt), "--run_dir", str(run_dir))
    with open(rl_setup["root"] / "preempt.log", "wb") as log:
        driver = _start_driver(ppo_args(rl_setup, *grpo, "--save_on_preempt",
                                         "--preempt_grace_s", str(PREEMPT_GRACE_S)), log)
    tree: dict[int, int] = {}
    try:
        while _logged_steps(run_dir / "metrics.jsonl") < 3:
            assert driver.poll() is None, (rl_setup["root"] / "preempt.log").read_text()[-4000:]
            time.sleep(0.2)
        tree = {driver.pid: _stat(driver.pid)[2], **_descendants(driver.pid)}
        signalled = time.monotonic()
        os.kill(driver.pid, signal.SIGTERM)
        driver.wait(timeout=PREEMPT_GRACE_S)
        while (alive := _alive_in(tree, driver.pid)) and time.monotonic() - signalled < PREEMPT_GRACE_S:
            time.sleep(0.5)
        assert not alive, f"alive {PREEMPT_GRACE_S} s after SIGTERM: {alive}"
    finally:
        _kill_leftovers(tree)
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    output = (rl_setup["root"] / "preempt.log").read_text()
    assert driver.returncode == 128 + signal.SIGTERM, output[-4000:]
    saved = [p.name for p in (ckpt / "actor").iterdir() if p.name.startswith("global_step")]
    assert len(saved) == 1, saved  # no --save_steps: the preemption's checkpoint only
    done = int(saved[0].removeprefix("global_step"))
    assert done in (3, 4), output[-4000:]  # rollout 4 abandoned before training, or finished
    verify_checkpoint(ckpt / "actor" / saved[0])
    assert f"checkpoint of rollout {done} written" in output
    # A torn line after the checkpoint's rollouts, as a kill -9 mid-write leaves.
    with open(run_dir / "metrics.jsonl", "a") as record:
        record.write('{"step": 99, "rew')
    history = train_ppo_ray.main(ppo_args(rl_setup, *grpo, "--load_checkpoint"))
    assert [h["step"] for h in history] == list(range(done + 1, 6))
    record = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in record] == list(range(1, 6))
    assert [line["reward"] for line in record] == [h["reward"] for h in reference[:5]]
    assert [h["actor/policy_loss"] for h in history] == [h["actor/policy_loss"] for h in reference[done:5]]
