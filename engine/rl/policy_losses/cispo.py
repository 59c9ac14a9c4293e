"""CISPO (MiniMax-M1, arXiv:2506.13585, eq. 4-5): ``--policy_loss_type cispo``.

Each token's loss is ``-sg(clip(r_t, 1 - eps_low, 1 + eps_high)) A_t log pi(y_t)`` with
``r_t = pi(y_t) / pi_old(y_t)``: the importance weight is clipped and carries no gradient, so a
token whose ratio left the band still trains (PPO's clip would zero its gradient). The bounds are
--cispo_eps_clip_low (default 1.0: no lower bound, as the paper) and --cispo_eps_clip_high.
"""
from __future__ import annotations

import torch

from engine.rl.losses import LOG_RATIO_CLAMP
from engine.rl.policy_losses.registry import PolicyLoss, PolicyLossInputs, register_policy_loss


@register_policy_loss("cispo")
class CISPOLoss(PolicyLoss):
    needs = frozenset({"old_log_probs"})

    def __call__(self, inputs: PolicyLossInputs):
        settings = self.settings
        log_probs, mask = inputs.log_probs, inputs.mask
        with torch.no_grad():
            log_ratio = (log_probs - inputs.old_log_probs).clamp(min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
            ratio = log_ratio.exp()
            clipped = ratio.clamp(1.0 - settings.cispo_eps_clip_low, 1.0 + settings.cispo_eps_clip_high)
            weight = clipped if inputs.importance_weights is None else clipped * inputs.importance_weights
            metrics = {"clip_frac_sum": ((clipped != ratio).to(mask.dtype) * mask).sum(),
                       "approx_kl_sum": (-log_ratio * mask).sum()}
        loss_sum = inputs.aggregation.sum(-weight * inputs.advantages * log_probs, inputs.weights)
        return loss_sum, metrics
