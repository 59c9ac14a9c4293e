"""The actor's and critic's micro-batch losses on Megatron outputs (vocab-parallel logits, values).

Each returns ``(loss_sum * scale, metrics)``: the masked token sum scaled to the optimizer
step's global token mean (``engine.runtime.schedule.token_mean_scale``), so the gradient is
the same for every TP / PP / CP / DP layout.
"""
from __future__ import annotations

import torch

from engine.rl.losses import kl_loss, policy_loss, value_loss
from engine.rl.vocab_parallel import token_entropy, token_log_probs


def policy_loss_fn(settings: dict, *, scale: float, tp_group):
    temperature = settings.get("temperature", 1.0)
    kl_coef = settings.get("kl_loss_coef", 0.0)

    def loss_fn(logits: torch.Tensor, batch: dict):
        mask = batch["action_mask"]
        log_probs = token_log_probs(logits, batch["labels"], temperature=temperature)
        loss_sum, info = policy_loss(
            log_probs, batch["old_log_probs"], batch["advantages"], mask,
            eps_clip=settings["eps_clip"], eps_clip_high=settings.get("eps_clip_high"),
            dual_clip=settings.get("dual_clip"), normaliser=1.0,
        )
        metrics = {"policy_loss_sum": loss_sum.detach(), "num_tokens": mask.sum().detach(),
                   "clip_frac": info["clip_frac"].detach(), "approx_kl": info["approx_kl"].detach()}
        total = loss_sum
        if kl_coef > 0:
            kl_sum = kl_loss(log_probs, batch["ref_log_probs"], mask, settings.get("kl_estimator", "k3"), normaliser=1.0)
            total = total + kl_coef * kl_sum
            metrics["kl_loss_sum"] = kl_sum.detach()
        entropy = token_entropy(logits, tp_group, temperature=temperature)
        metrics["entropy_sum"] = (entropy * mask).sum()
        return total * scale, metrics

    return loss_fn


def value_loss_fn(settings: dict, *, scale: float, tp_group=None):
    def loss_fn(values: torch.Tensor, batch: dict):
        mask = batch["action_mask"]
        loss_sum = value_loss(values[..., 0].float(), batch["values"], batch["returns"], mask,
                              value_clip=settings.get("value_clip"), normaliser=1.0)
        return loss_sum * scale, {"value_loss_sum": loss_sum.detach(), "num_tokens": mask.sum().detach()}

    return loss_fn


def make_loss_fn(kind: str, settings: dict, *, scale: float, tp_group):
    if kind == "policy":
        return policy_loss_fn(settings, scale=scale, tp_group=tp_group)
    if kind == "value":
        return value_loss_fn(settings, scale=scale)
    raise ValueError(f"unknown loss {kind!r}")
