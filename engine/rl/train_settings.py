"""What the driver sends the actor / critic ranks to train on one rollout."""
from __future__ import annotations

from dataclasses import dataclass

from engine.rl.kl import KLEstimator


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
    # --use_dynamic_batch_size's --max_tokens_per_gpu: micro-batches of at most this many tokens, packed,
    # balanced over DP ranks by tokens (engine.data.token_budget); None: micro_train_batch_size rows
    max_tokens_per_gpu: int | None = None
    # --vllm_is_correction's cap of the truncated importance weights (the training forward computes
    # them from the batch's rollout_log_probs: engine.rl.train_losses.rollout_mismatch)
    vllm_is_cap: float | None = None
    vllm_is_low: float = 0.0  # the band's low end (LOW of --vllm_is_truncated_threshold LOW HIGH)
    vllm_is_correction_type: str = "tis"  # tis | icepop | seq-mask-tis
    policy_loss_type: str = "ppo"  # --policy_loss_type: a name of engine.rl.policy_losses.registry
    loss_agg_mode: str = "token-mean"  # --loss_agg_mode (engine.rl.policy_losses.aggregation)
    # seq-mean-token-sum-norm's constant per-sequence divisor (Dr. GRPO): --generate_max_len
    max_response_len: int = 1
    entropy_coef: float = 0.0  # --entropy_coef: the entropy bonus, aggregated like the policy loss
    cispo_eps_clip_low: float = 1.0  # --policy_loss_type cispo's weight bounds: [1 - low, 1 + high]
    cispo_eps_clip_high: float = 0.28
    # Count the tokens whose routing differs from the engines' (MoE actor; the training forward is the
    # first of the rollout: no old-log-prob forward) as rollout/routing_mismatch
    measure_routing: bool = False
