"""The actor's and critic's micro-batch losses on Megatron outputs (vocab-parallel logits, values).

Each returns ``(loss_sum * scale, metrics)``: the weighted token sum scaled to the optimizer
step's aggregated loss (``engine.rl.policy_losses.aggregation``; the critic's and the default
``--loss_agg_mode token-mean`` are the global token mean), so the gradient is the same for every
TP / PP / CP / DP layout. The actor's ptx term (``engine.rl.ptx``) has its
own scale: its token mean is over the step's pretraining tokens, not its response tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from engine.rl.losses import (
    band_masked_importance_weights,
    kl_loss,
    sft_loss,
    truncated_importance_weights,
    value_loss,
)
from engine.rl.policy_losses.aggregation import Aggregation
from engine.rl.policy_losses.registry import PolicyLoss, PolicyLossInputs, policy_loss_class
from engine.rl.train_settings import TrainSettings
from engine.runtime.vocab_parallel import token_entropy, token_log_probs

LossKind = Literal["policy", "value"]


@dataclass(frozen=True, kw_only=True)
class LossGroups:
    """The process groups a loss may reduce over."""

    tp_group: Any = None  # the vocab-parallel entropy
    cp_group: Any = None  # a sequence split over context-parallel ranks
    dp_group: Any = None


def policy_loss_fn(settings: TrainSettings, *, aggregation: Aggregation, groups: LossGroups, ptx_scale: float = 0.0):
    """The ``--policy_loss_type`` loss (+ KL loss) on the rollout rows, aggregated by
    ``--loss_agg_mode``; with ``settings.ptx_coef`` and a ``loss_mask`` in the batch, plus
    ``ptx_coef`` x the NLL of the pretraining rows."""
    temperature = settings.temperature
    kl_coef = settings.kl_loss_coef
    ptx_coef = settings.ptx_coef
    policy = policy_loss_class(settings.policy_loss_type)(settings)
    scale = aggregation.scale

    def loss_fn(logits: torch.Tensor, batch: dict):
        mask = batch["action_mask"]
        weights = aggregation.token_weights(mask, batch)
        log_probs = token_log_probs(logits, batch["labels"], temperature=temperature)
        # No old log-probs: the rollout feeds one optimizer step, so the policy that sampled it is
        # this one and the ratio is 1 by construction (its gradient is the log-prob's).
        old_log_probs = batch.get("old_log_probs")
        old_log_probs = log_probs.detach() if old_log_probs is None else old_log_probs
        importance, engine_metrics = rollout_mismatch(old_log_probs, batch, settings, cp_group=groups.cp_group)
        inputs = _policy_inputs(policy, batch, log_probs=log_probs, old_log_probs=old_log_probs, weights=weights,
                                aggregation=aggregation, groups=groups, importance_weights=importance)
        loss_sum, policy_metrics = policy(inputs)
        metrics = {**aggregation.metric("policy_loss", loss_sum), "num_tokens": mask.sum().detach(),
                   **policy_metrics, **engine_metrics}
        total = loss_sum
        if kl_coef > 0:
            kl_sum = kl_loss(log_probs, batch["ref_log_probs"], weights, settings.kl_estimator, normaliser=1.0)
            total = total + kl_coef * kl_sum
            metrics.update(aggregation.metric("kl_loss", kl_sum))
        entropy = token_entropy(logits, groups.tp_group, temperature=temperature,
                                differentiable=settings.entropy_coef > 0)
        if settings.entropy_coef > 0:  # the bonus: aggregated like the policy loss, and subtracted
            entropy_sum = aggregation.sum(entropy, weights)
            total = total - settings.entropy_coef * entropy_sum
            metrics.update(aggregation.metric("entropy_loss", entropy_sum))
        metrics["entropy_sum"] = (entropy.detach() * mask).sum()
        loss = total * scale
        if ptx_coef > 0 and "loss_mask" in batch:
            ptx_sum = _ptx_nll_sum(logits, batch, log_probs, temperature)
            loss = loss + ptx_coef * ptx_sum * ptx_scale
            # Not "_sum" names: reduce_metrics would divide them by the response-token count.
            metrics["ptx_nll_total"] = ptx_sum.detach()
            metrics["ptx_num_tokens"] = batch["loss_mask"].sum().detach()
        return loss, metrics

    return loss_fn


def _policy_inputs(policy: PolicyLoss, batch: dict, *, log_probs, old_log_probs, weights, aggregation, groups,
                   importance_weights) -> PolicyLossInputs:
    """What ``policy`` declared it needs, and nothing else."""
    needs = policy.needs
    tensors = {}
    for key in ("ref_log_probs", "rollout_log_probs", "values"):
        if key in needs:
            if batch.get(key) is None:
                raise ValueError(f"--policy_loss_type {policy.name} needs {key}, which this run does not compute "
                                 f"({_WHY_MISSING[key]})")
            tensors[key] = batch[key]
    sequences = None
    if "sequence_index" in needs:
        sequences = {"sequence_index": batch["sequence_index"], "num_sequences": batch["num_sequences"]}
    return PolicyLossInputs(
        log_probs=log_probs, advantages=batch["advantages"], mask=batch["action_mask"], weights=weights,
        aggregation=aggregation, importance_weights=importance_weights,
        old_log_probs=old_log_probs if "old_log_probs" in needs else None,
        cp_group=groups.cp_group if "cp_group" in needs else None,
        dp_group=groups.dp_group if "dp_group" in needs else None,
        sequences=sequences, **tensors,
    )


_WHY_MISSING = {"ref_log_probs": "a reference model: --init_kl_coef > 0",
                "values": "a critic: --advantage_estimator gae",
                "rollout_log_probs": "the engines' log-probs"}


# Metrics of the rollout (the engines' mismatch with the trainer), not of the actor: the loop
# reports them under these names as they are (``rollout_mismatch`` makes them).
ROLLOUT_METRICS = ("rollout_logprob_abs_diff", "vllm_is/mean", "vllm_is/max", "vllm_is/capped_frac",
                   "vllm_is/masked_frac", "rollout/routing_mismatch")


def rollout_mismatch(old_log_probs: torch.Tensor, batch: dict, settings: TrainSettings, *, cp_group=None):
    """The one place the engines' mismatch with the trainer is measured: when the batch carries the
    engines' log-probs of the sampled tokens, the mean |logp_old - logp_engine| and, with
    --vllm_is_correction (``settings.vllm_is_cap``), the weights the policy loss is multiplied by
    (``importance_weights``, by --vllm_is_correction_type), with their mean / max and the share of
    tokens capped (tis) or masked (icepop, seq-mask-tis). ``old_log_probs``: the scored old
    log-probs, or this forward's own when the rollout feeds one step (the same policy)."""
    rollout = batch.get("rollout_log_probs")
    if rollout is None:
        return None, {}
    mask = batch["action_mask"]
    metrics = {"rollout_logprob_abs_diff_sum": ((old_log_probs - rollout).abs() * mask).sum()}
    cap = settings.vllm_is_cap
    if cap is None:
        return None, metrics
    kind, low = settings.vllm_is_correction_type, settings.vllm_is_low
    if kind == "tis":
        weights, raw = truncated_importance_weights(old_log_probs, rollout, mask, cap=cap,
                                                    low=low if low > 0 else None)
        metrics["vllm_is/capped_frac_sum"] = (((raw > cap) | (raw < low)).float() * mask).sum()
    else:
        weights, kept = band_masked_importance_weights(old_log_probs, rollout, mask, low=low, high=cap,
                                                       sequence=kind == "seq-mask-tis", batch=batch, cp_group=cp_group)
        metrics["vllm_is/masked_frac_sum"] = ((1.0 - kept) * mask).sum()
    metrics.update({"vllm_is/mean_sum": weights.sum(),
                    "vllm_is/max": weights.max() if weights.numel() else weights.new_zeros(())})
    return weights, metrics


def _ptx_nll_sum(logits: torch.Tensor, batch: dict, log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    # The ptx NLL is the model's own likelihood: the sampling temperature does not apply.
    if temperature != 1.0:
        log_probs = token_log_probs(logits, batch["labels"])
    return sft_loss(log_probs, batch["loss_mask"], normaliser=1.0)


def value_loss_fn(settings: TrainSettings, *, scale: float):
    def loss_fn(values: torch.Tensor, batch: dict):
        mask = batch["action_mask"]
        loss_sum = value_loss(values[..., 0].float(), batch["values"], batch["returns"], mask,
                              value_clip=settings.value_clip, normaliser=1.0)
        return loss_sum * scale, {"value_loss_sum": loss_sum.detach(), "num_tokens": mask.sum().detach()}

    return loss_fn


def make_loss_fn(kind: LossKind, settings: TrainSettings, *, aggregation: Aggregation, groups: LossGroups,
                 ptx_scale: float = 0.0):
    """The actor's loss (``policy``: ``--policy_loss_type`` aggregated by ``aggregation``) or the
    critic's (``value``: the token mean, ``aggregation.scale`` of a token-mean aggregation)."""
    if kind == "policy":
        return policy_loss_fn(settings, aggregation=aggregation, groups=groups, ptx_scale=ptx_scale)
    if kind == "value":
        return value_loss_fn(settings, scale=aggregation.scale)
    raise ValueError(f"unknown loss {kind!r}")


__all__ = ["LossGroups", "LossKind", "TrainSettings", "make_loss_fn", "policy_loss_fn", "value_loss_fn"]
