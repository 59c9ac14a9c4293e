"""The actor's and critic's micro-batch losses on Megatron outputs (vocab-parallel logits, values).

Each returns ``(loss_sum * scale, metrics)``: the masked token sum scaled to the optimizer
step's global token mean (``engine.runtime.schedule.token_mean_scale``), so the gradient is
the same for every TP / PP / CP / DP layout. The actor's ptx term (``engine.rl.ptx``) has its
own scale: its token mean is over the step's pretraining tokens, not its response tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from engine.rl.kl import KLEstimator
from engine.rl.losses import kl_loss, policy_loss, sft_loss, truncated_importance_weights, value_loss
from engine.runtime.vocab_parallel import token_entropy, token_log_probs


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """What the driver sends the actor / critic ranks to train on one rollout."""

    train_batch_size: int  # samples per optimizer step
    micro_train_batch_size: int
    max_epochs: int  # passes over the rollout
    seed: int  # shuffles the rollout's rows each epoch
    eps_clip: float = 0.2  # low clip (and high, unless eps_clip_high)
    eps_clip_high: float | None = None
    dual_clip: float | None = None
    value_clip: float | None = None
    temperature: float = 1.0  # the sampling temperature, applied to the trainer's logits too
    kl_loss_coef: float = 0.0  # 0: no KL loss term
    kl_estimator: KLEstimator = "k1"
    ptx_coef: float = 0.0  # 0: no pretraining rows
    pad_token_id: int = 0
    packing_samples: bool = False  # each micro-batch's rows packed into one (no padding computed)
    # --vllm_is_correction's cap, for weights computed in the training forward (batches with
    # rollout_log_probs and no precomputed rollout_is_weights)
    vllm_is_cap: float | None = None


LossKind = Literal["policy", "value"]


def policy_loss_fn(settings: TrainSettings, *, scale: float, tp_group, ptx_scale: float = 0.0):
    """PPO surrogate (+ KL loss) on the rollout rows; with ``settings.ptx_coef`` and a
    ``loss_mask`` in the batch, plus ``ptx_coef`` x the NLL of the pretraining rows."""
    temperature = settings.temperature
    kl_coef = settings.kl_loss_coef
    ptx_coef = settings.ptx_coef

    def loss_fn(logits: torch.Tensor, batch: dict):
        mask = batch["action_mask"]
        log_probs = token_log_probs(logits, batch["labels"], temperature=temperature)
        # No old log-probs: the rollout feeds one optimizer step, so the policy that sampled it is
        # this one and the ratio is 1 by construction (its gradient is the log-prob's).
        old_log_probs = batch.get("old_log_probs")
        old_log_probs = log_probs.detach() if old_log_probs is None else old_log_probs
        weights, engine_metrics = _engine_mismatch(old_log_probs, batch, settings.vllm_is_cap)
        loss_sum, info = policy_loss(
            log_probs, old_log_probs, batch["advantages"], mask,
            eps_clip=settings.eps_clip, eps_clip_high=settings.eps_clip_high,
            dual_clip=settings.dual_clip, normaliser=1.0, importance_weights=weights,
        )
        metrics = {"policy_loss_sum": loss_sum.detach(), "num_tokens": mask.sum().detach(),
                   "clip_frac": info["clip_frac"].detach(), "approx_kl": info["approx_kl"].detach(), **engine_metrics}
        total = loss_sum
        if kl_coef > 0:
            kl_sum = kl_loss(log_probs, batch["ref_log_probs"], mask, settings.kl_estimator, normaliser=1.0)
            total = total + kl_coef * kl_sum
            metrics["kl_loss_sum"] = kl_sum.detach()
        entropy = token_entropy(logits, tp_group, temperature=temperature)
        metrics["entropy_sum"] = (entropy * mask).sum()
        loss = total * scale
        if ptx_coef > 0 and "loss_mask" in batch:
            ptx_sum = _ptx_nll_sum(logits, batch, log_probs, temperature)
            loss = loss + ptx_coef * ptx_sum * ptx_scale
            # Not "_sum" names: reduce_metrics would divide them by the response-token count.
            metrics["ptx_nll_total"] = ptx_sum.detach()
            metrics["ptx_num_tokens"] = batch["loss_mask"].sum().detach()
        return loss, metrics

    return loss_fn


def _engine_mismatch(old_log_probs: torch.Tensor, batch: dict, cap: float | None):
    """The importance weights of the policy loss and, when the batch carries the engines' log-probs
    (the old-log-prob forward was skipped), the train-vs-engine metrics from this forward's own:
    ``logprob_abs_diff`` and, with ``cap``, the truncated weights min(exp(logp - logp_vLLM), cap)."""
    weights = batch.get("rollout_is_weights")
    rollout = batch.get("rollout_log_probs")
    if rollout is None:
        return weights, {}
    mask = batch["action_mask"]
    metrics = {"logprob_abs_diff_sum": ((old_log_probs - rollout).abs() * mask).sum()}
    if weights is None and cap is not None:
        weights, raw = truncated_importance_weights(old_log_probs, rollout, mask, cap=cap)
        metrics.update(is_weight_sum=weights.sum(), is_capped_sum=((raw > cap).float() * mask).sum(),
                       is_weight_max=weights.max() if weights.numel() else weights.new_zeros(()))
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


def make_loss_fn(kind: LossKind, settings: TrainSettings, *, scale: float, tp_group, ptx_scale: float = 0.0):
    if kind == "policy":
        return policy_loss_fn(settings, scale=scale, tp_group=tp_group, ptx_scale=ptx_scale)
    if kind == "value":
        return value_loss_fn(settings, scale=scale)
    raise ValueError(f"unknown loss {kind!r}")
