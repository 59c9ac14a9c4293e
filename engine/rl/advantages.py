"""Advantages and returns for the RL loop: token-level rewards, GAE, REINFORCE return-to-go,
group baselines (RLOO, GRPO, REINFORCE++-baseline), whitening, dynamic filtering and running
reward statistics.

Pure tensor math (torch / stdlib only). Per-token tensors are ``[batch, response_len]`` with an
``action_mask`` (1 for response tokens, 0 for padding); sequence rewards are ``[batch]`` with the
``n_samples_per_prompt`` samples of one prompt next to each other (``batch = num_prompts * n``).
Masked positions are invisible to every recursion here and come out as 0, wherever they are
(right padding, left padding, or masked tokens inside a multi-turn response).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from engine.rl.config import (  # noqa: F401  (declared apart: the parsers import no torch)
    ADVANTAGE_ESTIMATOR_ALIASES,
    ADVANTAGE_ESTIMATORS,
    GROUP_ESTIMATORS,
    AdvantageConfig,
    check_discount,
)

AdvantageEstimator = Literal["gae", "reinforce", "reinforce_baseline", "rloo", "grpo", "dr_grpo"]
# Estimators whose advantages are whitened over the whole batch afterwards (OpenRLHF's choice:
# RLOO and GRPO advantages are already centred per group).
WHITENED_ESTIMATORS: tuple[str, ...] = ("gae", "reinforce", "reinforce_baseline")

BaselineKind = Literal["rloo", "grpo", "reinforce_baseline", "dr_grpo"]


# --------------------------------------------------------------------------------- validation

def _check_per_token(name: str, tensor: torch.Tensor, action_mask: torch.Tensor) -> None:
    if tensor.shape != action_mask.shape or tensor.dim() != 2:
        raise ValueError(f"{name} must be [batch, response_len] like action_mask {tuple(action_mask.shape)}, "
                         f"got {tuple(tensor.shape)}")


def _check_groups(rewards: torch.Tensor, n_samples_per_prompt: int) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be one sequence reward per sample, [batch], got {tuple(rewards.shape)}")
    if n_samples_per_prompt < 1:
        raise ValueError(f"--n_samples_per_prompt must be >= 1, got {n_samples_per_prompt}")
    if rewards.numel() % n_samples_per_prompt != 0:
        raise ValueError(f"rewards has {rewards.numel()} samples, not a multiple of "
                         f"--n_samples_per_prompt={n_samples_per_prompt}")


# ----------------------------------------------------------------------------- token rewards

def last_token_index(action_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of every row, ``[batch]`` (0 for a row with none)."""
    length = action_mask.size(1)
    # argmax of the flipped mask finds the first 1 from the right (argmax returns the first max).
    return length - 1 - action_mask.long().fliplr().argmax(dim=1)


def compute_token_rewards(
    sequence_reward: torch.Tensor,
    kl: torch.Tensor | None,
    action_mask: torch.Tensor,
    *,
    kl_coef: float,
    reward_clip_range: tuple[float, float] | None = None,
    turn_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token rewards: the (clipped) sequence reward on the last real token of each response,
    minus ``kl_coef * kl`` on every real token (OpenRLHF's ``compute_reward``). Rows without any
    real token get all zeros.

    ``turn_rewards`` (``[batch, response_len]``, --turn_rewards per_turn): rewards a multi-turn
    trajectory earned before its last turn, each on its turn's last token. They move there from
    the last token, which keeps the rest: the row's token rewards still sum to its sequence reward."""
    if kl_coef < 0:
        raise ValueError(f"--init_kl_coef must be >= 0, got {kl_coef}")
    if sequence_reward.shape != action_mask.shape[:1]:
        raise ValueError(f"sequence_reward must be [batch]={action_mask.shape[0]}, got {tuple(sequence_reward.shape)}")
    reward = sequence_reward.float()
    if reward_clip_range is not None:
        reward = reward.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    token_rewards = torch.zeros(action_mask.shape, dtype=torch.float32, device=action_mask.device)
    if turn_rewards is not None:
        _check_per_token("turn_rewards", turn_rewards, action_mask)
        earlier = torch.where(action_mask.bool(), turn_rewards.float(), 0.0)
        reward = reward - earlier.sum(dim=1)
        token_rewards = token_rewards + earlier
    token_rewards.scatter_add_(1, last_token_index(action_mask).unsqueeze(1), reward.unsqueeze(1))
    if kl is not None:
        _check_per_token("kl", kl, action_mask)
        token_rewards = token_rewards - kl_coef * kl.float()
    return torch.where(action_mask.bool(), token_rewards, 0.0)


def per_turn_rewards(turns: list[list[tuple[int, float]]], action_mask: torch.Tensor) -> torch.Tensor:
    """``compute_token_rewards``' ``turn_rewards`` from each row's ``(label position of a turn's last
    token, that turn's reward)`` pairs (the turns before the last; the last one's stays with the
    sequence reward)."""
    out = torch.zeros(action_mask.shape, dtype=torch.float32)
    for row, pairs in enumerate(turns):
        for position, reward in pairs:  # on an untrained token (masked) it stays with the sequence reward
            out[row, position] += reward
    return out


# ------------------------------------------------------------------------ returns and GAE

@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    gamma: float,
    lambd: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015), ``(advantages, returns)``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lambd * A_{t+1}``
    over the real tokens of each row (``V`` after the last real token is 0); ``returns = A + V``.
    The recursion runs backward over time and is vectorised over the batch.
    """
    _check_per_token("rewards", rewards, action_mask)
    _check_per_token("values", values, action_mask)
    check_discount("gamma", gamma)
    check_discount("lambd", lambd)
    real = action_mask.bool()
    rewards, values = rewards.float(), values.float()
    last_gae = rewards.new_zeros(rewards.size(0))
    next_value = rewards.new_zeros(rewards.size(0))
    advantages = []
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        gae = delta + gamma * lambd * last_gae
        # At a masked position the carries pass through unchanged: padding is skipped, not
        # treated as a zero-reward step (which would discount across it).
        last_gae = torch.where(real[:, t], gae, last_gae)
        next_value = torch.where(real[:, t], values[:, t], next_value)
        advantages.append(torch.where(real[:, t], gae, 0.0))
    advantages = torch.stack(advantages[::-1], dim=1)
    returns = torch.where(real, advantages + values, 0.0)
    return advantages, returns


@torch.no_grad()
def reinforce_returns(token_rewards: torch.Tensor, action_mask: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """Discounted return-to-go ``G_t = r_t + gamma * G_{t+1}`` over the real tokens of each row."""
    _check_per_token("token_rewards", token_rewards, action_mask)
    check_discount("gamma", gamma)
    real = action_mask.bool()
    token_rewards = token_rewards.float()
    running = token_rewards.new_zeros(token_rewards.size(0))
    returns = []
    for t in reversed(range(token_rewards.size(1))):
        running = torch.where(real[:, t], token_rewards[:, t] + gamma * running, running)
        returns.append(torch.where(real[:, t], running, 0.0))
    return torch.stack(returns[::-1], dim=1)


# --------------------------------------------------------------------------- group baselines

def group_baseline(
    rewards: torch.Tensor,
    n_samples_per_prompt: int,
    *,
    kind: BaselineKind,
    eps: float = 1e-9,
) -> torch.Tensor:
    """Sequence rewards ``[num_prompts * n]`` minus a baseline from the same prompt's samples.

    ``rloo``: minus the mean of the other ``n - 1`` samples (leave-one-out).
    ``grpo``: ``(r - mean) / (std + eps)`` per group (unbiased std, as OpenRLHF's group_norm).
    Every estimator gives exactly 0 to a group whose rewards are all equal.
    ``reinforce_baseline`` / ``dr_grpo``: ``r - mean`` per group (REINFORCE++-baseline; Dr. GRPO,
    which unlike it is not whitened over the batch afterwards, as OpenRLHF's dr_grpo).
    """
    if kind not in GROUP_ESTIMATORS:
        raise ValueError(f"--advantage_estimator {kind!r} has no group baseline; expected one of {GROUP_ESTIMATORS}")
    _check_groups(rewards, n_samples_per_prompt)
    if n_samples_per_prompt < 2:
        # With one sample per prompt every baseline equals the reward: all advantages would be 0.
        raise ValueError(f"--advantage_estimator {kind} needs --n_samples_per_prompt > 1, "
                         f"got {n_samples_per_prompt}")
    # float64: the group statistics of float32 rewards carry no rounding error of their own.
    grouped = rewards.double().view(-1, n_samples_per_prompt)
    mean = grouped.mean(dim=1, keepdim=True)
    if kind == "rloo":
        baselined = grouped - (grouped.sum(dim=1, keepdim=True) - grouped) / (n_samples_per_prompt - 1)
    elif kind == "grpo":
        baselined = (grouped - mean) / (grouped.std(dim=1, keepdim=True) + eps)
    else:
        baselined = grouped - mean
    # A group whose rewards are all equal carries no signal: exactly 0, not the rounding error of
    # its mean (which the std division of grpo would blow up to |advantage| ~ 1 / eps).
    tied = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    baselined = baselined.masked_fill(tied, 0.0)
    return baselined.view(-1).to(torch.promote_types(rewards.dtype, torch.float32))


# --------------------------------------------------------------------------------- whitening

def whiten(
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    std_norm: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Normalise advantages by the mean and (biased) std over all real tokens of the batch: the
    REINFORCE++ global normalisation. ``std_norm=False`` (``--no_advantage_std_norm``) only
    subtracts the mean. Masked positions come out as 0."""
    _check_per_token("advantages", advantages, action_mask)
    mask = action_mask.float()
    num_tokens = mask.sum().clamp(min=1.0)  # an all-masked batch gives zeros, not NaN
    mean = (advantages * mask).sum() / num_tokens
    centred = (advantages - mean) * mask
    if not std_norm:
        return centred
    var = centred.square().sum() / num_tokens
    return centred * var.clamp(min=eps).rsqrt()


# ------------------------------------------------------------------------------- entry point


@dataclass(kw_only=True)
class AdvantageInputs:
    """What one rollout batch brings to the advantage computation."""

    rewards: torch.Tensor                  # [batch] sequence rewards, n samples of a prompt adjacent
    action_mask: torch.Tensor              # [batch, response_len]
    kl: torch.Tensor | None = None         # [batch, response_len] per-token KL for the reward penalty
    kl_coef: float = 0.0                   # the KL controller's current value
    values: torch.Tensor | None = None     # [batch, response_len] critic values (GAE only)
    turn_rewards: torch.Tensor | None = None  # [batch, response_len] earlier turns' rewards (compute_token_rewards)


@torch.no_grad()
def compute_advantages(inputs: AdvantageInputs, config: AdvantageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)``, both ``[batch, response_len]``, for ``config.estimator``.

    As OpenRLHF: group baseline on the sequence rewards (rloo / grpo / reinforce_baseline / dr_grpo) ->
    token rewards (clip, KL penalty) -> GAE (gae) or return-to-go (the others; advantages =
    returns) -> batch whitening (gae / reinforce / reinforce_baseline).
    """
    estimator = config.estimator
    rewards = inputs.rewards
    if inputs.turn_rewards is not None and estimator in GROUP_ESTIMATORS:
        raise ValueError(f"--advantage_estimator {estimator} baselines whole trajectories: per-turn rewards need "
                         "gae or reinforce (--turn_rewards sum gives it the trajectories' summed rewards)")
    if estimator in GROUP_ESTIMATORS:
        rewards = group_baseline(rewards, config.n_samples_per_prompt, kind=estimator)
    token_rewards = compute_token_rewards(rewards, inputs.kl, inputs.action_mask, kl_coef=inputs.kl_coef,
                                          reward_clip_range=config.reward_clip_range, turn_rewards=inputs.turn_rewards)
    if estimator == "gae":
        if inputs.values is None:
            raise ValueError("--advantage_estimator gae needs critic values (is a critic configured?)")
        advantages, returns = compute_gae(token_rewards, inputs.values, inputs.action_mask,
                                          gamma=config.gamma, lambd=config.lambd)
    else:
        returns = reinforce_returns(token_rewards, inputs.action_mask, gamma=config.gamma)
        advantages = returns.clone()
    if estimator in WHITENED_ESTIMATORS:
        advantages = whiten(advantages, inputs.action_mask, std_norm=config.advantage_std_norm)
    return advantages, returns


# ------------------------------------------------------------------------ reward statistics

Moments = tuple[float, float, float]  # (count, mean, M2): M2 is the sum of squared deviations


def moments_of(x: torch.Tensor) -> Moments:
    """``(count, mean, M2)`` of all elements of ``x``, in float64."""
    x = x.detach().double().flatten()
    count = x.numel()
    if count == 0:
        return 0.0, 0.0, 0.0
    mean = x.mean()
    return float(count), float(mean), float((x - mean).square().sum())


class RunningMoments:
    """Running mean / std of rewards across updates (``--normalize_reward``).

    Statistics merge with Chan et al.'s parallel formula, so a process can fold in another's
    ``state()`` or a batch's ``moments_of(x)`` (e.g. after gathering them from every rank).
    """

    def __init__(self, eps: float = 1e-8):
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0
        self.eps = eps

    def state(self) -> Moments:
        """``(count, mean, M2)`` so far."""
        return self.count, self.mean, self.m2

    def merge(self, count: float, mean: float, m2: float) -> None:
        """Fold in the moments of samples not seen yet (another process's, or a new batch's)."""
        if count <= 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total

    def update(self, x: torch.Tensor) -> None:
        """Fold in every element of ``x``."""
        self.merge(*moments_of(x))

    @property
    def std(self) -> float:
        """Unbiased standard deviation so far (1.0 before two samples have been seen)."""
        if self.count < 2:
            return 1.0
        return math.sqrt(self.m2 / (self.count - 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` with the statistics so far."""
        return (x - self.mean) / max(self.std, self.eps)
