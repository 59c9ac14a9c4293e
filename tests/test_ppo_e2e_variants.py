"""GRPO variants end to end (tests/rl_harness.py: the task): one step off-policy with IS
correction and background checkpoints, the 2026 recipe (GSPO, refill, token budgets), a LoRA actor.
"""
from __future__ import annotations

from tests.rl_harness import MARGIN, ppo_args, rise


def test_async_grpo_is_one_step_off_policy_and_corrected(rl_setup, ray_cluster):
    """--async_train: rollout k+1 is generated while the actor trains on rollout k, so from the second
    rollout on the engine's samples come from the weights before the last update (staleness 1, a
    real train-vs-engine log-prob gap that the truncated importance weights correct). Checkpoints every
    3 rollouts are written in the background (--async_save), each with an HF export (--save_hf_ckpt)."""
    from engine.cli import train_ppo_ray

    ckpt = rl_setup["root"] / "ckpt_async"
    history = train_ppo_ray.main(ppo_args(
        rl_setup, "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "9",
        "--async_train", "--vllm_is_correction", "--vllm_is_truncated_threshold", "1.5",
        "--ckpt_path", str(ckpt), "--save_steps", "3", "--max_ckpt_num", "2", "--async_save", "--save_hf_ckpt",
    ))
    # Published by a later train step once the writers are done (the writer's time logged there), the
    # last one before the run returned; rotation ran after each publication.
    assert sorted(p.name for p in (ckpt / "actor").iterdir()) == [
        "global_step3_hf", "global_step6", "global_step6_hf", "global_step9", "global_step9_hf"]
    assert all((ckpt / "actor" / f"global_step{n}_hf" / "config.json").exists() for n in (3, 6, 9))
    published = [h["step"] for h in history if "actor/checkpoint/write_s" in h]
    assert published and all(4 <= step <= 9 for step in published), published
    assert [h["rollout/staleness"] for h in history] == [0] + [1] * 8
    assert history[0]["rollout_logprob_abs_diff"] < 1e-4  # the first rollout: the actor's own weights
    assert min(h["rollout_logprob_abs_diff"] for h in history[1:]) > 1e-4  # then one update behind
    assert all(h["vllm_is/max"] <= 1.5 + 1e-6 for h in history)
    assert any(abs(h["vllm_is/mean"] - 1.0) > 1e-4 for h in history[1:])
    assert all("time/generate_wait" in h for h in history[:-1])
    assert rise(history) >= MARGIN, [h["reward"] for h in history]


def test_grpo_with_a_lora_actor(rl_setup, ray_cluster):
    """A TP=2 LoRA actor: before every rollout the engine gets W + scale B A merged shard by shard
    (its log-probs equal the adapted actor's), the reward rises, and --save_path is a PEFT adapter."""
    from engine.cli import train_ppo_ray

    save_path = rl_setup["root"] / "grpo_lora"
    history = train_ppo_ray.main(ppo_args(
        rl_setup, "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "9",
        "--actor_num_gpus_per_node", "2", "--actor_tensor_model_parallel_size", "2",
        "--lora_rank", "8", "--lora_alpha", "16", "--learning_rate", "2e-3", "--save_path", str(save_path),
    ))
    assert max(h["rollout_logprob_abs_diff"] for h in history) < 1e-4
    assert rise(history) >= MARGIN, [h["reward"] for h in history]
    assert (save_path / "adapter_model.safetensors").exists() and not (save_path / "model.safetensors").exists()


def test_dapo_recipe_with_gspo_refill_and_token_budgets_learns(rl_setup, ray_cluster):
    """The 2026 recipe end to end: GSPO's sequence ratio aggregated seq-mean-token-mean, an entropy bonus,
    DAPO's refill (all-equal groups dropped, more prompts generated until --rollout_batch_size groups are
    kept) and overlong shaping, one step off-policy (--async_train), scored and trained in token-budget
    micro-batches. The trained groups are mixed by construction, so learning shows in the reward of
    everything generated."""
    from engine.cli import train_ppo_ray

    history = train_ppo_ray.main(ppo_args(
        rl_setup, "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "9",
        "--policy_loss_type", "gspo", "--loss_agg_mode", "seq-mean-token-mean", "--entropy_coef", "0.001",
        "--dynamic_filtering", "--overlong_buffer_len", "4", "--async_train",
        "--use_dynamic_batch_size", "--max_tokens_per_gpu", "96",
    ))
    assert [h["rollout/groups_trained"] for h in history] == [16] * 9
    for h in history:
        assert h["rollout/groups_generated"] == h["rollout/groups_kept"] + h["rollout/groups_dropped"]
        assert "overlong/penalty" in h and "actor/entropy_loss" in h
    assert sum(h["rollout/groups_dropped"] for h in history) > 0
    generated = [h["rollout/generated_reward"] for h in history]
    assert sum(generated[-3:]) / 3 - sum(generated[:3]) / 3 >= MARGIN, generated
