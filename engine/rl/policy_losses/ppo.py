"""PPO's clipped surrogate (``--policy_loss_type ppo``, the default), with clip-higher, dual-clip
and the truncated importance weights of ``--vllm_is_correction`` (``engine.rl.losses.policy_loss``)."""
from __future__ import annotations

from engine.rl.losses import policy_loss
from engine.rl.policy_losses.registry import PolicyLoss, PolicyLossInputs, register_policy_loss


@register_policy_loss("ppo")
class PPOLoss(PolicyLoss):
    needs = frozenset({"old_log_probs"})

    def __call__(self, inputs: PolicyLossInputs):
        settings = self.settings
        # The aggregation weights stand in for the mask: the token sum they weight is the loss
        # (under token-mean they are the mask, and this is the masked token sum as before).
        loss_sum, info = policy_loss(
            inputs.log_probs, inputs.old_log_probs, inputs.advantages, inputs.weights,
            eps_clip=settings.eps_clip, eps_clip_high=settings.eps_clip_high, dual_clip=settings.dual_clip,
            normaliser=1.0, importance_weights=inputs.importance_weights,
        )
        return loss_sum, {"clip_frac": info["clip_frac"].detach(), "approx_kl": info["approx_kl"].detach()}
