"""KL divergence between the policy and the reference model: per-token estimators and the
controllers that set the coefficient of the KL penalty in the reward.

Pure tensor math (torch / numpy only): used by the experience maker (KL in the reward) and by
the actor loss (KL as a loss, GRPO style).
"""
from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3", "low_var_kl"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "low_var_kl")

# OpenRLHF clamps every per-token estimate: one token whose log-ratio explodes (a token the
# reference finds almost impossible) must not dominate the reward or the loss of a whole batch.
KL_CLAMP = 10.0
# low_var_kl (veRL's) also clamps the log-ratio before exp(): a clamped k3 of a log-ratio far
# below -20 overflows exp() to inf, and the clamp's zero gradient times inf is NaN.
LOW_VAR_KL_LOG_RATIO_CLAMP = 20.0


def kl_estimate(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    *,
    estimator: KLEstimator = "k1",
    action_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the log-probs of the sampled tokens.

    With ``log r = log_probs - ref_log_probs`` (Schulman, http://joschu.net/blog/kl-approx.html):
    ``k1 = log r`` (unbiased, can be negative), ``k2 = (log r)^2 / 2``,
    ``k3 = exp(-log r) - 1 + log r`` (unbiased and non-negative); ``low_var_kl`` is veRL's k3, with
    ``log r`` clamped to [-20, 20] first (finite values and gradients for any log-probs). Computed
    in float32 and clamped to [-10, 10] like OpenRLHF's ``compute_approx_kl``; zero where
    ``action_mask`` is 0.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"--kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if log_probs.shape != ref_log_probs.shape:
        raise ValueError(f"log_probs {tuple(log_probs.shape)} and ref_log_probs {tuple(ref_log_probs.shape)} "
                         "differ in shape")
    log_ratio = log_probs.float() - ref_log_probs.float()
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = log_ratio.square() / 2.0
    elif estimator == "low_var_kl":
        clamped = log_ratio.clamp(min=-LOW_VAR_KL_LOG_RATIO_CLAMP, max=LOW_VAR_KL_LOG_RATIO_CLAMP)
        kl = torch.expm1(-clamped) + clamped
    else:
        kl = torch.expm1(-log_ratio) + log_ratio  # expm1 keeps precision near log r = 0, where k3 ~ (log r)^2 / 2
    kl = kl.clamp(min=-KL_CLAMP, max=KL_CLAMP)
    if action_mask is not None:
        kl = torch.where(action_mask.bool(), kl, 0.0)  # not a product: padding may hold inf / NaN
    return kl


class FixedKLController:
    """Constant KL coefficient (``--init_kl_coef`` without ``--kl_target``)."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"--init_kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt; the same signature as the adaptive controller."""


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (https://arxiv.org/abs/1909.08593).

    After each rollout the coefficient is multiplied by ``1 + e * n_steps / horizon`` where
    ``e = clip(current_kl / kl_target - 1, -0.2, 0.2)``: it grows while the measured KL is above
    the target and shrinks while below, at a rate set by ``horizon`` (in samples).
    """

    def __init__(self, init_kl_coef: float, kl_target: float, horizon: int):
        if init_kl_coef < 0:
            raise ValueError(f"--init_kl_coef must be >= 0, got {init_kl_coef}")
        if kl_target <= 0:
            raise ValueError(f"--kl_target must be > 0, got {kl_target}")
        if horizon <= 0:
            raise ValueError(f"--kl_horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.kl_target = float(kl_target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adapt the coefficient to the KL measured over the last ``n_steps`` samples."""
        proportional_error = min(max(float(current_kl) / self.kl_target - 1.0, -0.2), 0.2)
        multiplier = 1.0 + proportional_error * n_steps / self.horizon
        # A rollout larger than 5 horizons could make the multiplier negative; a negative
        # coefficient would reward drifting away from the reference, so stop at zero instead.
        self.value = max(self.value * multiplier, 0.0)


def make_kl_controller(
    *, init_kl_coef: float, kl_target: float | None = None, kl_horizon: int = 10000
) -> FixedKLController | AdaptiveKLController:
    """The controller OpenRLHF builds: adaptive when ``--kl_target`` is set, fixed otherwise."""
    if kl_target is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, kl_target, kl_horizon)
