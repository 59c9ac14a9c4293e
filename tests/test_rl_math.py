"""RL math (engine/rl: kl, advantages, losses) against slow references written out with loops."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from engine.rl.advantages import (
    AdvantageConfig,
    AdvantageInputs,
    RunningMoments,
    compute_advantages,
    compute_gae,
    compute_token_rewards,
    group_baseline,
    moments_of,
    reinforce_returns,
    whiten,
)
from engine.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate, make_kl_controller
from engine.rl.losses import (
    aggregate_loss,
    entropy_from_logits,
    kl_loss,
    masked_mean,
    policy_loss,
    sft_loss,
    value_loss,
)

B, T = 6, 9


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mixed_mask() -> torch.Tensor:
    """Right padding, left padding, a hole in the middle, a full row, a one-token row, an empty row."""
    rows = [
        [1, 1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
    return torch.tensor(rows, dtype=torch.float32)


def _right_padded_mask(seed: int = 0) -> torch.Tensor:
    lengths = torch.randint(1, T + 1, (B,), generator=_generator(seed))
    return (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_generator(seed), dtype=torch.float64)


def _assert_close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=1e-5)


def _real_positions(mask_row) -> list[int]:
    return [t for t, m in enumerate(mask_row.tolist()) if m > 0]


# ------------------------------------------------------------------------------------ KL

def _kl_reference(lp: float, ref: float, estimator: str) -> float:
    log_r = lp - ref
    value = {"k1": log_r, "k2": log_r ** 2 / 2, "k3": math.exp(-log_r) - 1 + log_r}[estimator]
    return min(max(value, -10.0), 10.0)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_formulas(estimator):
    log_probs, ref_log_probs = _randn(B, T, seed=1) * 2, _randn(B, T, seed=2) * 2
    log_probs[0, 0], ref_log_probs[0, 0] = 0.0, 30.0  # exp(30) - ...: clamped to 10
    mask = _mixed_mask()
    log_probs[0, 8] = float("-inf")  # garbage at a padded position stays out
    kl = kl_estimate(log_probs, ref_log_probs, estimator=estimator, action_mask=mask)
    expected = [[_kl_reference(log_probs[i, t].item(), ref_log_probs[i, t].item(), estimator) if mask[i, t] else 0.0
                 for t in range(T)] for i in range(B)]
    _assert_close(kl, expected, atol=1e-5)
    assert kl.dtype == torch.float32


def test_k3_is_nonnegative_and_unknown_estimator_raises():
    kl = kl_estimate(_randn(B, T, seed=3), _randn(B, T, seed=4), estimator="k3")
    assert bool((kl >= 0).all())
    with pytest.raises(ValueError, match="--kl_estimator"):
        kl_estimate(torch.zeros(2, 3), torch.zeros(2, 3), estimator="k4")
    with pytest.raises(ValueError, match="shape"):
        kl_estimate(torch.zeros(2, 3), torch.zeros(2, 4))


def test_adaptive_kl_controller_follows_the_formula():
    controller = AdaptiveKLController(init_kl_coef=0.1, kl_target=6.0, horizon=10000)
    expected = 0.1
    for current_kl, n_steps in [(12.0, 512), (6.5, 512), (1.0, 1024), (6.0, 256)]:
        controller.update(current_kl, n_steps)
        error = min(max(current_kl / 6.0 - 1, -0.2), 0.2)
        expected *= 1 + error * n_steps / 10000
        assert controller.value == pytest.approx(expected)
    # A rollout of more than 5 horizons must not flip the sign of the coefficient.
    controller.update(0.0, 60000)
    assert controller.value == 0.0


def test_fixed_kl_controller_and_factory():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    assert isinstance(make_kl_controller(init_kl_coef=0.01), FixedKLController)
    assert isinstance(make_kl_controller(init_kl_coef=0.01, kl_target=1.0, kl_horizon=100), AdaptiveKLController)
    for kwargs, flag in [(dict(init_kl_coef=-1.0), "--init_kl_coef"),
                         (dict(init_kl_coef=0.1, kl_target=0.0), "--kl_target"),
                         (dict(init_kl_coef=0.1, kl_target=1.0, kl_horizon=0), "--kl_horizon")]:
        with pytest.raises(ValueError, match=flag):
            make_kl_controller(**kwargs)


# --------------------------------------------------------------------------- token rewards

def _token_rewards_reference(sequence_reward, kl, mask, kl_coef, clip=None):
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for i in range(mask.size(0)):
        real = _real_positions(mask[i])
        for t in real:
            out[i, t] = -kl_coef * (kl[i, t].item() if kl is not None else 0.0)
        if real:
            r = sequence_reward[i].item()
            if clip is not None:
                r = min(max(r, clip[0]), clip[1])
            out[i, real[-1]] += r
    return out


@pytest.mark.parametrize("clip", [None, (-0.5, 0.5)])
def test_compute_token_rewards_matches_reference(clip):
    mask = _mixed_mask()
    rewards, kl = _randn(B, seed=5), _randn(B, T, seed=6).abs()
    out = compute_token_rewards(rewards, kl, mask, kl_coef=0.1, reward_clip_range=clip)
    _assert_close(out, _token_rewards_reference(rewards, kl, mask, 0.1, clip))
    assert out[5].abs().sum() == 0  # the empty row gets nothing
    _assert_close(compute_token_rewards(rewards, None, mask, kl_coef=0.1),
                  _token_rewards_reference(rewards, None, mask, 0.1))


def test_compute_token_rewards_errors():
    mask = _mixed_mask()
    with pytest.raises(ValueError, match="--init_kl_coef"):
        compute_token_rewards(torch.zeros(B), None, mask, kl_coef=-0.1)
    with pytest.raises(ValueError, match="sequence_reward"):
        compute_token_rewards(torch.zeros(B + 1), None, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl must be"):
        compute_token_rewards(torch.zeros(B), torch.zeros(B, T + 1), mask, kl_coef=0.1)


# -------------------------------------------------------------------------- GAE and returns

def _gae_reference(rewards, values, mask, gamma, lambd):
    """Per row: keep the real tokens, run the textbook recursion, put the results back."""
    advantages = torch.zeros(mask.shape, dtype=torch.float64)
    returns = torch.zeros(mask.shape, dtype=torch.float64)
    for i in range(mask.size(0)):
        real = _real_positions(mask[i])
        r = [rewards[i, t].item() for t in real]
        v = [values[i, t].item() for t in real]
        gae = 0.0
        for k in reversed(range(len(real))):
            next_value = v[k + 1] if k + 1 < len(real) else 0.0
            gae = r[k] + gamma * next_value - v[k] + gamma * lambd * gae
            advantages[i, real[k]] = gae
            returns[i, real[k]] = gae + v[k]
    return advantages, returns


@pytest.mark.parametrize("gamma,lambd", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_reference_with_padding(gamma, lambd):
    mask = _mixed_mask()
    rewards, values = _randn(B, T, seed=7), _randn(B, T, seed=8)
    rewards[mask == 0], values[mask == 0] = float("nan"), 123.0  # padding must not leak in
    advantages, returns = compute_gae(rewards, values, mask, gamma=gamma, lambd=lambd)
    expected_advantages, expected_returns = _gae_reference(rewards, values, mask, gamma, lambd)
    _assert_close(advantages, expected_advantages)
    _assert_close(returns, expected_returns)
    assert torch.isfinite(advantages).all() and torch.isfinite(returns).all()


def test_gae_equals_openrlhf_recursion_on_right_padding():
    """OpenRLHF zeroes padded values/rewards and recurses over every position: the same result
    when padding is only on the right."""
    mask = _right_padded_mask(seed=9)
    rewards, values = _randn(B, T, seed=10) * mask, _randn(B, T, seed=11) * mask
    gamma, lambd = 0.97, 0.9
    last, reversed_advantages = 0.0, []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        last = rewards[:, t] + gamma * next_values - values[:, t] + gamma * lambd * last
        reversed_advantages.append(last)
    expected = torch.stack(reversed_advantages[::-1], dim=1)
    advantages, returns = compute_gae(rewards, values, mask, gamma=gamma, lambd=lambd)
    _assert_close(advantages, expected * mask)
    _assert_close(returns, (expected + values) * mask)


def test_gae_validates_arguments():
    mask = _mixed_mask()
    with pytest.raises(ValueError, match="--gamma"):
        compute_gae(torch.zeros(B, T), torch.zeros(B, T), mask, gamma=1.5, lambd=1.0)
    with pytest.raises(ValueError, match="--lambd"):
        compute_gae(torch.zeros(B, T), torch.zeros(B, T), mask, gamma=1.0, lambd=-0.1)
    with pytest.raises(ValueError, match="values must be"):
        compute_gae(torch.zeros(B, T), torch.zeros(B, T - 1), mask, gamma=1.0, lambd=1.0)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_returns_match_reference(gamma):
    mask = _mixed_mask()
    token_rewards = _randn(B, T, seed=12)
    expected = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        running = 0.0
        for t in reversed(_real_positions(mask[i])):
            running = token_rewards[i, t].item() + gamma * running
            expected[i, t] = running
    _assert_close(reinforce_returns(token_rewards, mask, gamma=gamma), expected)


# ---------------------------------------------------------------------- group baselines

def test_rloo_baseline_is_leave_one_out():
    n = 4
    rewards = _randn(3 * n, seed=13)
    expected = []
    for i in range(rewards.numel()):
        group = range(i // n * n, i // n * n + n)
        others = [rewards[j].item() for j in group if j != i]
        expected.append(rewards[i].item() - sum(others) / len(others))
    _assert_close(group_baseline(rewards, n, kind="rloo"), expected)


def test_grpo_and_reinforce_baseline_use_group_statistics():
    n = 5
    rewards = _randn(4 * n, seed=14)
    rewards[10:15] = 0.7  # one group with equal rewards: zeros, not NaN
    grpo, centred = [], []
    for g in range(4):
        group = rewards[g * n:(g + 1) * n].tolist()
        mean, std = statistics.fmean(group), statistics.stdev(group)
        grpo += [(r - mean) / (std + 1e-9) for r in group]
        centred += [r - mean for r in group]
    _assert_close(group_baseline(rewards, n, kind="grpo"), grpo, atol=1e-5)
    _assert_close(group_baseline(rewards, n, kind="reinforce_baseline"), centred)
    assert torch.isfinite(group_baseline(rewards, n, kind="grpo")).all()


@pytest.mark.parametrize("kind", ["rloo", "grpo", "reinforce_baseline", "dr_grpo"])
@pytest.mark.parametrize("n", [3, 6, 7, 16])
def test_tied_groups_get_exactly_zero_advantage(kind, n):
    """Non-dyadic rewards: float32's mean of six 0.3s is not 0.3, and grpo's division by the
    (equally tiny) std used to turn that into |advantage| ~ 30 on every token of the group."""
    tied = [torch.full((n,), value) for value in (0.3, 0.7, 123.456, -2.1)]
    mixed = torch.tensor([0.3, 0.7] * (n // 2) + [0.3] * (n % 2))
    rewards = torch.cat([*tied, mixed])
    advantages = group_baseline(rewards, n, kind=kind)
    assert advantages.dtype == torch.float32
    assert (advantages[: 4 * n] == 0).all(), advantages[: 4 * n]
    assert advantages[4 * n:].abs().max() > 0.1  # a group with a spread keeps its signal
    config = AdvantageConfig(estimator=kind, n_samples_per_prompt=n)
    mask = torch.ones(5 * n, 3)
    full, _ = compute_advantages(AdvantageInputs(rewards=rewards, action_mask=mask), config)
    if kind in ("rloo", "grpo", "dr_grpo"):  # reinforce_baseline is whitened over the batch afterwards
        assert (full[: 4 * n] == 0).all()


@pytest.mark.parametrize("kind", ["rloo", "grpo", "reinforce_baseline"])
def test_group_baseline_errors_name_the_flag(kind):
    with pytest.raises(ValueError, match=r"--n_samples_per_prompt > 1"):
        group_baseline(torch.zeros(4), 1, kind=kind)
    with pytest.raises(ValueError, match=r"not a multiple of --n_samples_per_prompt=4"):
        group_baseline(torch.zeros(10), 4, kind=kind)
    with pytest.raises(ValueError, match=r"\[batch\]"):
        group_baseline(torch.zeros(4, 2), 2, kind=kind)
    with pytest.raises(ValueError, match="--advantage_estimator"):
        group_baseline(torch.zeros(4), 2, kind="gae")


# ----------------------------------------------------------------------------- whitening

@pytest.mark.parametrize("std_norm", [True, False])
def test_whiten_uses_masked_statistics(std_norm):
    mask = _mixed_mask()
    advantages = _randn(B, T, seed=15) * 3 + 1
    real = [advantages[i, t].item() for i in range(B) for t in _real_positions(mask[i])]
    mean, std = statistics.fmean(real), statistics.pstdev(real)
    expected = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        for t in _real_positions(mask[i]):
            expected[i, t] = (advantages[i, t].item() - mean) / (std if std_norm else 1.0)
    _assert_close(whiten(advantages, mask, std_norm=std_norm), expected)


def test_whiten_all_masked_is_finite():
    out = whiten(torch.randn(3, 4), torch.zeros(3, 4))
    assert torch.equal(out, torch.zeros(3, 4))


# ------------------------------------------------------------------------- entry point

def _pipeline_reference(estimator, rewards, kl, kl_coef, values, mask, n, gamma, lambd, clip, std_norm):
    """compute_advantages written out from the per-piece references above."""
    seq = rewards.tolist()
    if estimator in ("rloo", "grpo", "reinforce_baseline"):
        out = []
        for g in range(len(seq) // n):
            group = seq[g * n:(g + 1) * n]
            mean = statistics.fmean(group)
            for r in group:
                if estimator == "rloo":
                    out.append(r - (sum(group) - r) / (n - 1))
                elif estimator == "grpo":
                    out.append((r - mean) / (statistics.stdev(group) + 1e-9))
                else:
                    out.append(r - mean)
        seq = out
    token_rewards = _token_rewards_reference(torch.tensor(seq), kl, mask, kl_coef, clip)
    if estimator == "gae":
        advantages, returns = _gae_reference(token_rewards, values, mask, gamma, lambd)
    else:
        returns = torch.zeros(mask.shape, dtype=torch.float64)
        for i in range(mask.size(0)):
            running = 0.0
            for t in reversed(_real_positions(mask[i])):
                running = token_rewards[i, t].item() + gamma * running
                returns[i, t] = running
        advantages = returns.clone()
    if estimator in ("gae", "reinforce", "reinforce_baseline"):
        real = [advantages[i, t].item() for i in range(mask.size(0)) for t in _real_positions(mask[i])]
        mean, std = statistics.fmean(real), statistics.pstdev(real) if std_norm else 1.0
        advantages = (advantages - mean) / std * mask
    return advantages, returns


@pytest.mark.parametrize("estimator", ["gae", "reinforce", "reinforce_baseline", "rloo", "grpo"])
def test_compute_advantages_matches_composed_reference(estimator):
    n = 3
    mask = _mixed_mask()
    batch = mask.size(0)
    rewards, kl, values = _randn(batch, seed=16) * 2, _randn(batch, T, seed=17).abs() * mask, _randn(batch, T, seed=18)
    group = estimator in ("rloo", "grpo", "reinforce_baseline")
    config = AdvantageConfig(estimator=estimator, n_samples_per_prompt=n if group else 1,
                             gamma=1.0 if group else 0.95, lambd=0.9, reward_clip_range=(-3.0, 3.0),
                             advantage_std_norm=estimator != "reinforce")
    inputs = AdvantageInputs(rewards=rewards, action_mask=mask, kl=kl, kl_coef=0.05,
                             values=values if estimator == "gae" else None)
    advantages, returns = compute_advantages(inputs, config)
    expected_advantages, expected_returns = _pipeline_reference(
        estimator, rewards, kl, 0.05, values, mask, config.n_samples_per_prompt, config.gamma, config.lambd,
        config.reward_clip_range, config.advantage_std_norm)
    _assert_close(advantages, expected_advantages, atol=1e-5)
    _assert_close(returns, expected_returns, atol=1e-5)


def test_advantage_config_validation():
    assert AdvantageConfig(estimator="group_norm", n_samples_per_prompt=2).estimator == "grpo"
    for kwargs, message in [
        (dict(estimator="ppo"), "--advantage_estimator must be one of"),
        (dict(estimator="grpo", n_samples_per_prompt=1), "--n_samples_per_prompt > 1"),
        (dict(estimator="rloo", n_samples_per_prompt=4, gamma=0.99), "--gamma must be 1.0"),
        (dict(estimator="gae", gamma=1.1), "--gamma"),
        (dict(estimator="gae", reward_clip_range=(1.0, -1.0)), "--reward_clip_range"),
        (dict(estimator="reinforce", n_samples_per_prompt=0), "--n_samples_per_prompt must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            AdvantageConfig(**kwargs)
    with pytest.raises(ValueError, match="critic values"):
        compute_advantages(AdvantageInputs(rewards=torch.zeros(B), action_mask=_mixed_mask()), AdvantageConfig())


# --------------------------------------------------------------------------- running moments

def test_running_moments_match_batch_statistics_and_merge():
    batches = [_randn(7, seed=19) * 3 + 2, _randn(1, seed=20), _randn(12, seed=21) - 4]
    everything = torch.cat(batches).tolist()
    moments = RunningMoments()
    assert moments.std == 1.0
    for batch in batches:
        moments.update(batch)
    assert moments.count == len(everything)
    assert moments.mean == pytest.approx(statistics.fmean(everything))
    assert moments.std == pytest.approx(statistics.stdev(everything))
    # Two "processes" each see part of the data; merging their states gives the same moments.
    left, right = RunningMoments(), RunningMoments()
    left.update(batches[0])
    right.update(batches[1])
    right.update(batches[2])
    left.merge(*right.state())
    assert left.state() == pytest.approx(moments.state())
    left.merge(*moments_of(torch.zeros(0)))  # an empty batch changes nothing
    assert left.state() == pytest.approx(moments.state())
    x = torch.tensor([0.0, 1.0])
    mean, std = statistics.fmean(everything), statistics.stdev(everything)
    _assert_close(moments.normalize(x), [(v - mean) / std for v in (0.0, 1.0)])


# --------------------------------------------------------------------------------- losses

def test_masked_mean_reference_and_empty_mask():
    x, mask = _randn(B, T, seed=22), _mixed_mask()
    real = [x[i, t].item() for i in range(B) for t in _real_positions(mask[i])]
    _assert_close(masked_mean(x, mask), statistics.fmean(real))
    rows = [statistics.fmean([x[i, t].item() for t in _real_positions(mask[i])]) if mask[i].any() else 0.0
            for i in range(B)]
    _assert_close(masked_mean(x, mask, dim=-1), rows)
    _assert_close(masked_mean(x, None), x.mean())
    leaf = torch.randn(2, 3, requires_grad=True)
    out = masked_mean(leaf, torch.zeros(2, 3))
    out.backward()
    assert out.item() == 0.0 and torch.equal(leaf.grad, torch.zeros(2, 3))


def test_aggregate_loss_token_and_sequence_level():
    x, mask = _randn(B, T, seed=23), _mixed_mask()
    real_rows = [[x[i, t].item() for t in _real_positions(mask[i])] for i in range(B)]
    token_sum = sum(sum(row) for row in real_rows)
    sequence_means = [statistics.fmean(row) for row in real_rows if row]
    _assert_close(aggregate_loss(x, mask), token_sum / sum(len(row) for row in real_rows))
    _assert_close(aggregate_loss(x, mask, normaliser=100.0), token_sum / 100.0)
    _assert_close(aggregate_loss(x, mask, token_level_loss=False), statistics.fmean(sequence_means))
    _assert_close(aggregate_loss(x, mask, token_level_loss=False, normaliser=10.0), sum(sequence_means) / 10.0)


def _ppo_reference(lp, old, adv, eps_low, eps_high, dual_clip):
    ratio = math.exp(min(max(lp - old, -20.0), 20.0))
    surr1, surr2 = ratio * adv, min(max(ratio, 1 - eps_low), 1 + eps_high) * adv
    objective = min(surr1, surr2)
    if dual_clip is not None and adv < 0:
        objective = max(objective, dual_clip * adv)
    return -objective, surr2 < surr1


@pytest.mark.parametrize("eps_high,dual_clip", [(None, None), (0.28, None), (None, 3.0)])
def test_policy_loss_matches_elementwise_reference(eps_high, dual_clip):
    mask = _mixed_mask()
    old = _randn(B, T, seed=24)
    log_probs = (old + _randn(B, T, seed=25) * 0.5).requires_grad_()
    advantages = _randn(B, T, seed=26)
    loss, metrics = policy_loss(log_probs, old, advantages, mask, eps_clip=0.2, eps_clip_high=eps_high,
                                dual_clip=dual_clip)
    losses, clipped, kls = [], [], []
    for i in range(B):
        for t in _real_positions(mask[i]):
            value, was_clipped = _ppo_reference(log_probs[i, t].item(), old[i, t].item(), advantages[i, t].item(),
                                                0.2, eps_high if eps_high is not None else 0.2, dual_clip)
            losses.append(value)
            clipped.append(float(was_clipped))
            kls.append(old[i, t].item() - log_probs[i, t].item())
    _assert_close(loss, statistics.fmean(losses))
    _assert_close(metrics["clip_frac"], statistics.fmean(clipped))
    _assert_close(metrics["approx_kl"], statistics.fmean(kls))
    loss.backward()
    assert torch.isfinite(log_probs.grad).all() and log_probs.grad[mask == 0].abs().sum() == 0


def test_policy_loss_is_finite_on_huge_ratios_and_validates():
    log_probs = torch.tensor([[100.0, -100.0]], requires_grad=True)
    loss, _ = policy_loss(log_probs, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), eps_clip=0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_probs.grad).all()
    with pytest.raises(ValueError, match="--dual_clip"):
        policy_loss(log_probs, torch.zeros(1, 2), torch.ones(1, 2), None, eps_clip=0.2, dual_clip=1.0)
    with pytest.raises(ValueError, match="--eps_clip"):
        policy_loss(log_probs, torch.zeros(1, 2), torch.ones(1, 2), None, eps_clip=-0.1)


@pytest.mark.parametrize("value_clip", [None, 0.2])
def test_value_loss_matches_elementwise_reference(value_clip):
    mask = _mixed_mask()
    old_values, returns = _randn(B, T, seed=27), _randn(B, T, seed=28)
    values = old_values + _randn(B, T, seed=29) * 0.5
    losses = []
    for i in range(B):
        for t in _real_positions(mask[i]):
            v, old, ret = values[i, t].item(), old_values[i, t].item(), returns[i, t].item()
            error = (v - ret) ** 2
            if value_clip is not None:
                clipped = old + min(max(v - old, -value_clip), value_clip)
                error = max(error, (clipped - ret) ** 2)
            losses.append(error)
    _assert_close(value_loss(values, old_values, returns, mask, value_clip=value_clip), 0.5 * statistics.fmean(losses))
    with pytest.raises(ValueError, match="--value_clip"):
        value_loss(values, old_values, returns, mask, value_clip=0.0)


def test_entropy_matches_reference_and_is_stable():
    logits = _randn(3, 4, 11, seed=30) * 3
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for i in range(3):
        for t in range(4):
            row = logits[i, t].tolist()
            z = sum(math.exp(v) for v in row)
            expected[i, t] = -sum(math.exp(v) / z * math.log(math.exp(v) / z) for v in row)
    _assert_close(entropy_from_logits(logits), expected, atol=1e-5)
    # Large logits do not overflow; -inf entries (masked vocabulary) are left out, gradients finite.
    big = torch.tensor([[1e4, 1e4, -1e4]])
    _assert_close(entropy_from_logits(big), [math.log(2)])
    masked = torch.tensor([[0.5, -1.0, float("-inf"), 2.0]], requires_grad=True)
    entropy = entropy_from_logits(masked)
    _assert_close(entropy, entropy_from_logits(torch.tensor([[0.5, -1.0, 2.0]])))
    entropy.sum().backward()
    assert torch.isfinite(masked.grad).all()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_loss_is_masked_mean_of_estimate(estimator):
    mask = _mixed_mask()
    log_probs, ref = _randn(B, T, seed=31), _randn(B, T, seed=32)
    values = [_kl_reference(log_probs[i, t].item(), ref[i, t].item(), estimator)
              for i in range(B) for t in _real_positions(mask[i])]
    _assert_close(kl_loss(log_probs, ref, mask, estimator), statistics.fmean(values), atol=1e-5)


def test_sft_loss_is_token_mean_nll():
    mask = _mixed_mask()
    token_log_probs = -_randn(B, T, seed=33).abs()
    values = [-token_log_probs[i, t].item() for i in range(B) for t in _real_positions(mask[i])]
    _assert_close(sft_loss(token_log_probs, mask), statistics.fmean(values))
    assert sft_loss(token_log_probs, torch.zeros(B, T)).item() == 0.0


# ------------------------------------------------------------------ vocab-parallel log-probs

def _vocab_parallel_body(rank, world_size):
    from megatron.core import parallel_state as ps

    from engine.runtime.vocab_parallel import token_entropy, token_log_probs
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    initialize_parallel(ParallelConfig(tensor_model_parallel_size=world_size))
    full = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(1))
    local = full.chunk(world_size, dim=-1)[ps.get_tensor_model_parallel_rank()].clone()
    before = local.clone()
    log_probs = token_log_probs(local, labels, temperature=1.0)
    entropy = token_entropy(local, ps.get_tensor_model_parallel_group())
    return {"log_probs": log_probs, "entropy": entropy, "intact": torch.equal(local, before)}


@pytest.mark.parametrize("world_size", [1, 2], ids=["tp1", "tp2"])
def test_vocab_parallel_log_probs_and_entropy_match_full_softmax_and_keep_the_logits(world_size):
    from tests.dist_harness import run_distributed

    full = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = torch.log_softmax(full, -1)
    for result in run_distributed(_vocab_parallel_body, world_size, timeout=120):
        assert result["intact"]  # later terms (entropy, KD) read the same logits
        torch.testing.assert_close(result["log_probs"], expected.gather(-1, labels[..., None])[..., 0])
        torch.testing.assert_close(result["entropy"], -(expected.exp() * expected).sum(-1))
