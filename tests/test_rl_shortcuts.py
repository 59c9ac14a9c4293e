"""Work the RL loop skips because it would change nothing (issue 18): the actor's old-log-prob
forward when a rollout feeds one optimizer step, the reference when nothing reads it."""
from __future__ import annotations

import pytest

from tests.dist_harness import run_distributed

BASE = ["--pretrain", "m", "--prompt_data", "p.jsonl", "--remote_rm_url", "r.py"]


def _job(*extra):
    from engine.cli import train_ppo_ray

    return train_ppo_ray.parse_args([*BASE, *extra])


@pytest.mark.parametrize("extra,reference,needed", [
    (["--rollout_batch_size", "8", "--train_batch_size", "8"], False, False),  # one step: skipped
    (["--rollout_batch_size", "8", "--train_batch_size", "4"], False, True),  # two steps: the 2nd needs them
    (["--rollout_batch_size", "8", "--train_batch_size", "8", "--max_epochs", "2"], False, True),
    (["--rollout_batch_size", "8", "--train_batch_size", "8"], True, True),  # KL penalty in the reward
    (["--rollout_batch_size", "8", "--train_batch_size", "8", "--use_kl_loss"], True, False),  # KL in the loss
    (["--rollout_batch_size", "8", "--train_batch_size", "8", "--use_kl_loss", "--kl_target", "0.1"], True, True),
])
def test_old_log_probs_are_scored_only_when_something_reads_them(extra, reference, needed):
    assert _job(*extra).ppo.needs_old_log_probs(reference=reference) is needed


def test_no_reference_model_without_a_kl_coefficient(tmp_path):
    from engine.cli import train_ppo_ray
    from models.tiny import build_tiny_model

    model = build_tiny_model("llama", tmp_path / "m")
    for extra in ([], ["--use_kl_loss"]):
        job = train_ppo_ray.parse_args(["--pretrain", model, "--prompt_data", "p.jsonl", "--remote_rm_url", "r.py",
                                        "--init_kl_coef", "0", *extra])
        assert "ref" not in train_ppo_ray.role_configs(job, total_steps=1)
    job = train_ppo_ray.parse_args(["--pretrain", model, "--prompt_data", "p.jsonl", "--remote_rm_url", "r.py"])
    assert "ref" in train_ppo_ray.role_configs(job, total_steps=1)


def _one_step_both_ways(rank, world, path):
    """One optimizer step on the same rollout twice: with the old log-probs scored first, and without
    the old-log-prob forward (the training forward's log-probs are the old ones); both give the
    --vllm_is_correction weights and the mismatch metrics in the training forward, which must equal
    a direct computation from the scored old log-probs."""
    import torch
    import torch.distributed as dist

    from engine.ray.role_worker import MegatronRoleWorker, RoleConfig
    from engine.rl.experience import Experience
    from engine.rl.losses import truncated_importance_weights
    from engine.rl.train_losses import TrainSettings
    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig
    from parallel.config import ParallelConfig

    engine_config = EngineConfig(pretrain=path, parallel=ParallelConfig(tensor_model_parallel_size=2),
                                 optim=OptimConfig(learning_rate=1e-3, lr_warmup_ratio=0.0))
    workers = []
    for _ in range(2):
        worker = MegatronRoleWorker(RoleConfig(name="actor", engine=engine_config, num_ranks=world, trainable=True), rank)
        worker.engine = TrainingEngine(engine_config, ctx=workers[0].engine.ctx if workers else None)
        workers.append(worker)
    g = torch.Generator().manual_seed(0)
    rows, length = 8, 24
    input_ids = torch.randint(3, 300, (rows, length), generator=g)
    mask = torch.zeros(rows, length)
    mask[:, 8:-1] = 1.0
    experience = Experience(input_ids=input_ids, labels=input_ids.roll(-1, 1), action_mask=mask,
                            position_ids=torch.arange(length).expand(rows, length).contiguous(),
                            last_index=torch.full((rows,), length - 1),
                            advantages=torch.randn(rows, length, generator=g) * mask)
    shard = workers[0].compute_log_probs(experience, 4)
    old = [shard.values if shard is not None else None]
    dist.broadcast_object_list(old, src=0)
    # The engines' log-probs: the actor's, off by up to +-0.6 nats per token.
    engine_log_probs = (old[0] + (torch.rand(rows, length, generator=g) - 0.5) * 1.2) * mask
    weights, raw = truncated_importance_weights(old[0], engine_log_probs, mask, cap=1.3)
    real = mask > 0
    direct = {"vllm_is/mean": float(weights[real].mean()), "vllm_is/max": float(weights[real].max()),
              "vllm_is/capped_frac": float((raw[real] > 1.3).float().mean()),
              "rollout_logprob_abs_diff": float(((old[0] - engine_log_probs).abs() * mask).sum() / mask.sum())}
    settings = TrainSettings(train_batch_size=rows, micro_train_batch_size=4, max_epochs=1, seed=0, vllm_is_cap=1.3)
    with_old = workers[0].train(experience.with_fields(old_log_probs=old[0], rollout_log_probs=engine_log_probs),
                                "policy", settings)
    without = workers[1].train(experience.with_fields(rollout_log_probs=engine_log_probs), "policy", settings)
    diff = max(float((a - b).abs().max()) for a, b in zip(workers[0].engine.model.parameters(),
                                                            workers[1].engine.model.parameters()))
    moved = max(float((a - b).abs().max()) for a, b in zip(workers[0].engine.model.parameters(),
                                                             TrainingEngine(engine_config, trainable=False,
                                                                            ctx=workers[0].engine.ctx).model.parameters()))
    return with_old, without, diff, moved, direct


def test_skipping_the_old_log_probs_trains_the_same_step_at_tp2(tiny_models):
    results = run_distributed(_one_step_both_ways, world_size=2, args=(tiny_models["llama"],), timeout=300)
    for with_old, without, diff, moved, direct in results:
        assert moved > 1e-4  # the step changed the weights ...
        assert diff < 1e-6, diff  # ... the same way both times
        assert without["policy_loss"] == pytest.approx(with_old["policy_loss"], rel=1e-5, abs=1e-7)
        assert without["clip_frac"] == 0.0
        # One route: both runs measure the mismatch in the training forward, equal to the direct
        # computation from the scored old log-probs, under the names the loop reports.
        for run in (with_old, without):
            for name in ("vllm_is/mean", "vllm_is/max", "vllm_is/capped_frac", "rollout_logprob_abs_diff"):
                assert run[name] == pytest.approx(direct[name], rel=1e-5), name
        assert 0 < direct["vllm_is/capped_frac"] < 1


# ----- --vllm_is_correction: truncated importance weights of the engines' mismatch ------------

def test_importance_weights_equal_a_direct_computation():
    import math

    import torch

    from engine.rl.train_losses import TrainSettings, rollout_mismatch

    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 10, generator=g) * 3
    rollout = old + (torch.rand(4, 10, generator=g) - 0.5) * 2
    mask = (torch.rand(4, 10, generator=g) > 0.3).float()
    settings = TrainSettings(train_batch_size=4, micro_train_batch_size=4, max_epochs=1, seed=0, vllm_is_cap=1.5)
    weights, sums = rollout_mismatch(old, {"rollout_log_probs": rollout, "action_mask": mask}, settings)
    metrics = {"vllm_is/mean": float(sums["vllm_is/mean_sum"] / mask.sum()), "vllm_is/max": float(sums["vllm_is/max"]),
               "vllm_is/capped_frac": float(sums["vllm_is/capped_frac_sum"] / mask.sum())}
    direct = [[min(math.exp(o - r), 1.5) * m for o, r, m in zip(*rows)]
              for rows in zip(old.tolist(), rollout.tolist(), mask.tolist())]
    assert torch.allclose(weights, torch.tensor(direct), atol=1e-6)
    real = [w for row, mrow in zip(direct, mask.tolist()) for w, m in zip(row, mrow) if m]
    raw = [math.exp(o - r) for orow, rrow, mrow in zip(old.tolist(), rollout.tolist(), mask.tolist())
           for o, r, m in zip(orow, rrow, mrow) if m]
    assert metrics["vllm_is/mean"] == pytest.approx(sum(real) / len(real), rel=1e-5)
    assert metrics["vllm_is/max"] == pytest.approx(max(real), rel=1e-5)
    assert metrics["vllm_is/capped_frac"] == pytest.approx(sum(x > 1.5 for x in raw) / len(raw))


def test_importance_weights_scale_each_tokens_policy_gradient():
    import torch

    from engine.rl.losses import policy_loss

    g = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 6, generator=g)
    advantages, mask = torch.randn(3, 6, generator=g), torch.ones(3, 6)
    weights = torch.rand(3, 6, generator=g) * 2
    grads = []
    for w in (None, weights):
        log_probs = old.clone().requires_grad_(True)
        loss, _ = policy_loss(log_probs, old, advantages, mask, eps_clip=0.2, importance_weights=w, normaliser=1.0)
        loss.backward()
        grads.append(log_probs.grad)
    assert torch.allclose(grads[1], grads[0] * weights)  # at ratio 1: d(-A r)/dlogp = -A, times the weight


def test_correction_needs_no_old_log_prob_forward_and_refuses_a_tempered_policy():
    from engine.cli.options import OptionError

    job = _job("--rollout_batch_size", "8", "--train_batch_size", "8", "--vllm_is_correction")
    assert not job.ppo.needs_old_log_probs(reference=False)  # the training forward's log-probs give the weights
    with pytest.raises(OptionError, match="--vllm_is_correction with --temperature 0.7"):
        _job("--vllm_is_correction", "--temperature", "0.7")
