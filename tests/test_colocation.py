"""Role placement (--colocate_actor_ref / --colocate_critic_reward / --colocate_all_models),
--ref_reward_offload, and the in-loop reward-model role (--reward_pretrain) against HF.

Colocation is real Ray placement on CPU too (a token CPU per bundle): rank i of every colocated
role must land in bundle i of one placement group. The reward role's scores must equal HF
``AutoModelForSequenceClassification`` on the same sequences, under TP=2 and under DP=2.
"""
from __future__ import annotations

import pytest
import torch

from engine.ray.colocation import ColocationConfig, colocated_sets


def test_colocated_sets_follow_the_flags_and_check_rank_counts():
    ranks = {"actor": 2, "ref": 2, "reward0": 1, "reward1": 1, "critic": 1}
    assert colocated_sets(ColocationConfig(), ranks) == []
    assert colocated_sets(ColocationConfig(colocate_actor_ref=True), ranks) == [["actor", "ref"]]
    assert colocated_sets(ColocationConfig(colocate_critic_reward=True), ranks) == [["critic", "reward0", "reward1"]]
    assert colocated_sets(ColocationConfig(colocate_actor_ref=True), {"actor": 2}) == []  # no reference: nothing to share
    with pytest.raises(ValueError, match=r"--colocate_all_models needs the same number of ranks .*'critic': 1"):
        colocated_sets(ColocationConfig(colocate_all_models=True), ranks)
    with pytest.raises(ValueError, match=r"--colocate_actor_ref .* got \{'actor': 2, 'ref': 1\}"):
        colocated_sets(ColocationConfig(colocate_actor_ref=True), {"actor": 2, "ref": 1})
    with pytest.raises(ValueError, match=r"--vllm_num_engines x --vllm_tensor_parallel_size \(1\) must equal"):
        colocated_sets(ColocationConfig(colocate_all_models=True), {"actor": 2}, engine_workers=1)


def test_train_ppo_ray_rejects_mismatched_colocation_before_starting(tmp_path):
    from engine.cli import train_ppo_ray

    with pytest.raises(ValueError, match="--colocate_actor_ref needs the same number of ranks for actor, ref"):
        train_ppo_ray.main(["--pretrain", str(tmp_path / "absent"), "--prompt_data", str(tmp_path / "absent.jsonl"),
                            "--remote_rm_url", str(tmp_path / "r.py"), "--init_kl_coef", "0.01",
                            "--colocate_actor_ref", "--actor_num_gpus_per_node", "2"])


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A tiny RM the way this project exports them (SequenceClassification, `score` head)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("colocation")
    policy = build_tiny_model("llama", root / "policy", seed=0)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    model.save_pretrained(root / "rm")
    AutoTokenizer.from_pretrained(policy).save_pretrained(root / "rm")
    return str(root / "rm")


def _rollout_inputs(path: str):
    from transformers import AutoTokenizer

    from engine.rl.experience import Experience
    from engine.rl.sequences import build_rollout_batch

    tokenizer = AutoTokenizer.from_pretrained(path)
    pairs = [("1+1=", "2"), ("12+30=", "42 and more words"), ("9+9=", "18"), ("a longer prompt: 7+8=", "15 15 15")]
    batch = build_rollout_batch([tokenizer(p)["input_ids"] for p, _ in pairs],
                                [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                                 for _, r in pairs], pad_id=tokenizer.pad_token_id)
    return Experience.from_rollout(batch)


def _hf_scores(path: str, inputs) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return torch.tensor([float(model(input_ids=row[:last + 1][None]).logits[0, 0])
                             for row, last in zip(inputs.input_ids, inputs.last_index)])


def test_colocated_critic_and_rewards_share_bundles_and_score_like_hf(ray_cluster, reward_model):
    from engine.ray.colocation import make_placements, release_placements
    from engine.ray.role_group import RoleGroup
    from engine.ray.role_worker import RoleConfig
    from engine.runtime.engine import EngineConfig
    from models.builder import ModelBuildConfig
    from parallel.config import ParallelConfig

    value_model = ModelBuildConfig(value_head=True)

    placements = make_placements(ColocationConfig(colocate_critic_reward=True), {"critic": 2, "reward0": 2})
    groups = []
    try:
        reward = RoleGroup(RoleConfig(name="reward", num_ranks=2, offload=True, engine=EngineConfig(
            pretrain=reward_model, build=value_model, parallel=ParallelConfig(tensor_model_parallel_size=2))),
                           placements["reward0"])
        groups.append(reward)
        # A frozen value model in the critic's place: what matters here is where its ranks go (DP=2).
        critic = RoleGroup(RoleConfig(name="critic", num_ranks=2,
                                      engine=EngineConfig(pretrain=reward_model, build=value_model)),
                           placements["critic"])
        groups.append(critic)
        groups_seen = {pg for g in (reward, critic) for pg in g.placement_group_ids()}
        assert len(groups_seen) == 1 and None not in groups_seen, groups_seen  # Ray's own view of each rank
        assert reward.bundle_indices == critic.bundle_indices == [0, 1]

        inputs = _rollout_inputs(reward_model)
        expected = _hf_scores(reward_model, inputs)
        scores = reward.rewards(inputs, 2)
        values = critic.values(inputs, 2)
        torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(values.gather(1, inputs.last_index[:, None])[:, 0], expected, atol=1e-4, rtol=0)
        assert expected.std() > 1e-3  # distinct scores: a constant would not pass by luck
        # --ref_reward_offload: between forwards the weights live in host memory (their home on CPU).
        assert reward.weights_devices() == ["cpu", "cpu"]
    finally:
        for group in groups:
            group.shutdown()
        release_placements(placements)
