"""Losses of the RL actor and critic: PPO clipped surrogate, clipped value loss, entropy,
KL-as-loss (GRPO) and the SFT (ptx) term.

Pure tensor math (torch only). Per-token tensors are ``[batch, response_len]`` with an
``action_mask``. Every loss reduces through ``aggregate_loss``: by default a mean over the real
tokens of this call; a trainer that accumulates micro-batches passes ``normaliser`` (e.g. the
token count of the whole optimizer step) so the step's loss is one mean, not a mean of means.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.rl.kl import KLEstimator, kl_estimate
from engine.runtime.per_sequence import per_token, sequence_means
from engine.runtime.reductions import aggregate_loss, masked_mean

# The log-ratio is clamped before exp() like OpenRLHF: a stale token with a huge log-ratio
# would overflow to inf and poison the batch (its gradient is clipped away anyway).
LOG_RATIO_CLAMP = 20.0


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor | None,
    *,
    eps_clip: float,
    eps_clip_high: float | None = None,
    dual_clip: float | None = None,
    token_level_loss: bool = True,
    normaliser: float | torch.Tensor | None = None,
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate ``-min(r A, clip(r, 1 - eps_clip, 1 + eps_clip_high) A)``.

    ``eps_clip_high`` defaults to ``eps_clip`` (asymmetric "clip-higher" as in DAPO otherwise).
    ``dual_clip`` (> 1, Ye et al. 2019) also bounds the loss of negative advantages by
    ``-dual_clip * A``. Returns the loss and detached metrics: ``clip_frac`` (fraction of real
    tokens where the clipped term was taken) and ``approx_kl`` (mean of old - new log-probs).
    ``importance_weights`` (per token, no gradient) scale each token's objective: the truncated
    importance sampling of ``--vllm_is_correction`` (:func:`truncated_importance_weights`, made by
    ``engine.rl.train_losses.rollout_mismatch``).
    """
    if eps_clip < 0:
        raise ValueError(f"--eps_clip must be >= 0, got {eps_clip}")
    eps_clip_high = eps_clip if eps_clip_high is None else eps_clip_high
    if eps_clip_high < 0:
        raise ValueError(f"--eps_clip_low_high: the high clip must be >= 0, got {eps_clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"--dual_clip must be > 1.0, got {dual_clip}")
    log_ratio = log_probs - old_log_probs
    ratio = log_ratio.clamp(min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP).exp()
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high) * advantages
    objective = torch.min(surr1, surr2)
    if dual_clip is not None:
        # Only for negative advantages: a huge ratio would otherwise give an unbounded loss.
        objective = torch.where(advantages < 0, torch.max(objective, dual_clip * advantages), objective)
    if importance_weights is not None:
        objective = objective * importance_weights.detach()
    loss = aggregate_loss(-objective, action_mask, token_level_loss=token_level_loss, normaliser=normaliser)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((surr2 < surr1).to(log_probs.dtype), action_mask),
            "approx_kl": masked_mean(-log_ratio, action_mask),
        }
    return loss, metrics


def truncated_importance_weights(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor,
                                 action_mask: torch.Tensor, *, cap: float, low: float | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min(exp(logp_actor_old - logp_vllm), cap) * action_mask, exp(...) uncapped)``, no gradient;
    with ``low`` also at least ``low`` (OpenRLHF 0.11's tis with a LOW HIGH band)."""
    if cap <= 0:
        raise ValueError(f"--vllm_is_truncated_threshold must be > 0, got {cap}")
    raw = _engine_ratio(old_log_probs, rollout_log_probs)
    return raw.clamp(min=low, max=cap) * action_mask, raw


def band_masked_importance_weights(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor,
                                   action_mask: torch.Tensor, *, low: float, high: float, sequence: bool,
                                   batch: dict | None = None, cp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w * kept * action_mask, kept)`` with ``w = exp(logp_actor_old - logp_vllm)``, no gradient.

    icepop (``sequence=False``): ``kept`` is 1 where ``low <= w <= high`` per token. seq-mask-tis
    (``sequence=True``, OpenRLHF 0.11's): 1 on every token of a sequence whose geometric-mean ``w``
    over its trained tokens (whole sequence: summed over ``cp_group``, packed sequences told apart
    by ``batch``'s ``sequence_index``) is in the band, and the tokens keep their own ``w``."""
    raw = _engine_ratio(old_log_probs, rollout_log_probs)
    if sequence:
        means, _ = sequence_means(raw.log(), action_mask, batch, cp_group=cp_group)
        ratio = per_token(means, batch, raw).exp()
    else:
        ratio = raw
    kept = ((ratio >= low) & (ratio <= high)).to(raw.dtype)
    return raw * kept * action_mask, kept


def _engine_ratio(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor) -> torch.Tensor:
    log_ratio = (old_log_probs - rollout_log_probs).detach().clamp(min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
    return log_ratio.exp()


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor | None,
    *,
    value_clip: float | None = None,
    token_level_loss: bool = True,
    normaliser: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Critic loss ``0.5 * (V - R)^2``; with ``value_clip`` the pessimistic max of it and the
    loss of ``old_V + clip(V - old_V, -value_clip, value_clip)`` (PPO's clipped value loss)."""
    if value_clip is not None and value_clip <= 0:
        raise ValueError(f"--value_clip must be > 0, got {value_clip}")
    squared_error = (values - returns).square()
    if value_clip is not None:
        clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        squared_error = torch.max(squared_error, (clipped - returns).square())
    return 0.5 * aggregate_loss(squared_error, action_mask, token_level_loss=token_level_loss, normaliser=normaliser)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy ``-sum_v p log p`` of ``softmax(logits)`` over the last dim, in float32.

    Stable for large logits and for ``-inf`` logits (masked vocabulary), where ``p log p`` is 0.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    # p = 0 where log p = -inf, and 0 * -inf is NaN: zero the log first (in forward and backward,
    # unlike a torch.where after the product, whose unused branch still sends NaN gradients).
    finite_log_p = log_p.masked_fill(torch.isneginf(log_p), 0.0)
    return -(log_p.exp() * finite_log_p).sum(dim=-1)


def kl_loss(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    action_mask: torch.Tensor | None,
    estimator: KLEstimator = "k3",
    *,
    token_level_loss: bool = True,
    normaliser: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """KL to the reference as a loss term (GRPO's ``--use_kl_loss``): the per-token estimate,
    reduced over the real tokens. k2 / k3 are the usual choices (k1's gradient is not a KL's)."""
    kl = kl_estimate(log_probs, ref_log_probs, estimator=estimator)
    return aggregate_loss(kl, action_mask, token_level_loss=token_level_loss, normaliser=normaliser)


def sft_loss(
    token_log_probs: torch.Tensor,
    loss_mask: torch.Tensor | None,
    *,
    token_level_loss: bool = True,
    normaliser: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative log-likelihood of the label tokens (the ptx term, ``--ptx_coef``): token mean
    over ``loss_mask`` of ``-token_log_probs`` (log-probs of the labels, e.g. from
    ``log_probs_from_logits``)."""
    return aggregate_loss(-token_log_probs, loss_mask, token_level_loss=token_level_loss, normaliser=normaliser)
