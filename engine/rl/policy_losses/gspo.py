"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071):
``--policy_loss_type gspo``.

The importance ratio is the sequence's, the geometric mean of its token ratios over its trained
tokens, ``s_i = exp(mean_t log(pi(y_it) / pi_old(y_it)))``, and it is clipped per sequence:
``-min(s_i A, clip(s_i, 1 - eps_low, 1 + eps_high) A)`` with --eps_clip / --eps_clip_low_high (the
paper's ranges are small: 3e-4 / 4e-4). Written in the paper's GSPO-token form (its eq. 13, veRL's
and OpenRLHF's): on every token ``s_it = sg[s_i] pi(y_it) / sg[pi(y_it)]``, whose value is ``s_i`` and
whose gradient is ``s_i`` times the token's log-prob gradient. With one advantage per sequence (GRPO,
RLOO, REINFORCE++-baseline) that is exactly GSPO: under ``--loss_agg_mode seq-mean-token-mean`` the
paper's objective, and under every mode the gradient of the sequence-level loss aggregated so.

The mean runs over the whole sequence: the CP ranks' shares are summed over the CP group, and
packed sequences are told apart by ``sequence_index``; so the ratio is the same at any layout.
"""
from __future__ import annotations

import torch

from engine.rl.losses import LOG_RATIO_CLAMP
from engine.rl.policy_losses.registry import PolicyLoss, PolicyLossInputs, register_policy_loss
from engine.runtime.per_sequence import per_token, sequence_means


@register_policy_loss("gspo")
class GSPOLoss(PolicyLoss):
    needs = frozenset({"old_log_probs", "cp_group", "sequence_index"})

    def sequence_log_ratio(self, inputs: PolicyLossInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log s_i, n_i)`` per sequence of the micro-batch (no gradient): the mean token
        log-ratio over its ``n_i`` trained tokens, on every CP rank the whole sequence's."""
        log_ratio = (inputs.log_probs - inputs.old_log_probs).detach()
        return sequence_means(log_ratio, inputs.mask, inputs.sequences, cp_group=inputs.cp_group)

    def __call__(self, inputs: PolicyLossInputs):
        settings = self.settings
        low, high = settings.eps_clip, settings.eps_clip if settings.eps_clip_high is None else settings.eps_clip_high
        log_probs, advantages = inputs.log_probs, inputs.advantages
        sequence_log_ratio = per_token(self.sequence_log_ratio(inputs)[0], inputs.sequences, log_probs)
        # Value log s_i, gradient the token's log-prob's; the sum last (veRL #2775: precision).
        log_ratio = log_probs - log_probs.detach() + sequence_log_ratio
        ratio = log_ratio.clamp(min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP).exp()
        surr1 = ratio * advantages
        surr2 = ratio.clamp(1.0 - low, 1.0 + high) * advantages
        objective = torch.min(surr1, surr2)
        if inputs.importance_weights is not None:
            objective = objective * inputs.importance_weights.detach()
        loss_sum = inputs.aggregation.sum(-objective, inputs.weights)
        mask = inputs.mask
        with torch.no_grad():
            metrics = {"clip_frac_sum": ((surr2 < surr1).to(mask.dtype) * mask).sum(),
                       "approx_kl_sum": (-(inputs.log_probs - inputs.old_log_probs) * mask).sum(),
                       "gspo/sequence_ratio_sum": (sequence_log_ratio.exp() * mask).sum()}
        return loss_sum, metrics
