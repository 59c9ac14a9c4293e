"""The RL algorithm's options (``PPOConfig`` and its advantage estimator), declared apart from the
loop so that a job's parser imports neither torch nor megatron-core."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from parallel.options import option

LossAggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


LOSS_AGG_MODES: tuple[str, ...] = get_args(LossAggMode)


def check_loss_agg_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"--loss_agg_mode {mode!r} is not one of {', '.join(LOSS_AGG_MODES)}")


ADVANTAGE_ESTIMATORS: tuple[str, ...] = ("gae", "reinforce", "reinforce_baseline", "rloo", "grpo", "dr_grpo")


# OpenRLHF calls GRPO's group normalisation "group_norm"; accept its flag value too.
ADVANTAGE_ESTIMATOR_ALIASES = {"group_norm": "grpo"}


def check_discount(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--{name} must be in [0, 1], got {value}")


@dataclass(kw_only=True)
class AdvantageConfig:
    """How advantages are estimated (the RL loop's ``--advantage_estimator`` family of flags)."""

    estimator: Literal["gae", "reinforce", "reinforce_baseline", "rloo", "grpo", "group_norm", "dr_grpo"] = option(
        "gae", flag="advantage_estimator",
        help="gae (critic), reinforce (REINFORCE++), reinforce_baseline, rloo, grpo (alias group_norm), dr_grpo "
             "(group mean baseline, no std)")
    gamma: float = option(1.0, help="discount")
    lambd: float = option(1.0, help="GAE lambda")
    reward_clip_range: tuple[float, float] | None = option(None, help="clip sequence rewards to [low, high]")
    advantage_std_norm: bool = option(True, flag="no_advantage_std_norm",
                                      help="do not divide advantages by their standard deviation")
    n_samples_per_prompt: int = 1  # the rollout's --n_samples_per_prompt (groups for the baselines)

    def __post_init__(self):
        self.estimator = ADVANTAGE_ESTIMATOR_ALIASES.get(self.estimator, self.estimator)
        if self.estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"--advantage_estimator must be one of {ADVANTAGE_ESTIMATORS}, got {self.estimator!r}")
        check_discount("gamma", self.gamma)
        check_discount("lambd", self.lambd)
        if self.n_samples_per_prompt < 1:
            raise ValueError(f"--n_samples_per_prompt must be >= 1, got {self.n_samples_per_prompt}")
        if self.estimator in GROUP_ESTIMATORS:
            if self.n_samples_per_prompt < 2:
                raise ValueError(f"--advantage_estimator {self.estimator} needs --n_samples_per_prompt > 1, "
                                 f"got {self.n_samples_per_prompt}")
            if self.gamma != 1.0:
                # OpenRLHF silently resets gamma to 1 here: the sequence reward sits on the last
                # token, so discounting would weight tokens of one response differently.
                raise ValueError(f"--gamma must be 1.0 with --advantage_estimator {self.estimator}, got {self.gamma}")
        if self.reward_clip_range is not None:
            low, high = self.reward_clip_range
            if not low < high:
                raise ValueError("--reward_clip_range must be (low, high) with low < high, "
                                 f"got {self.reward_clip_range}")


@dataclass(kw_only=True)
class PPOConfig:
    """The RL algorithm (OpenRLHF's flags)."""

    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    rollout_batch_size: int = option(1024, help="prompts per rollout")
    n_samples_per_prompt: int = option(1, help="responses sampled per prompt")
    train_batch_size: int = option(128, help="samples per optimizer step")
    micro_train_batch_size: int = option(4, help="samples per training micro-batch per rank")
    micro_rollout_batch_size: int = option(8, help="samples per forward micro-batch when scoring")
    max_epochs: int = option(1, help="PPO epochs over each rollout")
    num_episodes: int = option(1, help="passes over the prompt set")
    max_steps: int | None = option(None, help="rollouts to run (default: the prompt set over --num_episodes)")
    eps_clip: float = option(0.2, help="PPO clip range")
    eps_clip_low_high: tuple[float, float] | None = option(
        None, help="asymmetric clip range LOW HIGH (DAPO's clip-higher); overrides --eps_clip")
    dual_clip: float | None = option(None, help="dual-clip PPO bound (> 1) on the loss of negative advantages")
    value_clip: float | None = option(0.2, help="critic value clip range")
    init_kl_coef: float = option(0.01, help="KL coefficient (0: no reference model)")
    kl_target: float | None = option(None, help="adaptive KL controller target (default: a fixed coefficient)")
    kl_horizon: int = option(10000, help="adaptive KL controller horizon")
    use_kl_loss: bool = option(False, help="KL as a loss term (GRPO) instead of a reward penalty")
    kl_estimator: Literal["k1", "k2", "k3"] = option("k1", value_aliases={"use_kl_estimator_k3": "k3"},
                                                     help="KL estimator")
    normalize_reward: bool = option(False, help="reward models' rewards and the critic's values as (x - mean) / std "
                                                "with the mean / std in their config.json (OpenRLHF's; train_rm "
                                                "saves them)")
    normalize_reward_running: bool = option(False, help="normalise the rollout's rewards by their running mean / "
                                                        "std over the rollouts so far")
    dynamic_filtering: bool = option(False, help="drop GRPO groups whose rewards are all equal")
    nonfinite_reward_policy: Literal["error", "skip"] = option(
        "error", help="a NaN / inf reward from any source: error (naming the source and the sample) or skip "
                      "(drop that sample's prompt group from the rollout, counted as rollout/nonfinite_rewards)")
    vllm_is_correction: bool = option(False, help="weight each token's policy gradient by min(exp(logp_actor - "
                                                  "logp_vLLM), --vllm_is_truncated_threshold): truncated importance "
                                                  "sampling of the engines' mismatch with the trainer")
    vllm_is_truncated_threshold: float = option(2.0, help="cap of the --vllm_is_correction weights")
    packing_samples: bool = option(False, help="pack each scoring / training micro-batch's prompt + response "
                                               "sequences into one row instead of padding them to the longest "
                                               "(the same losses; no compute on padding)")
    async_train: bool = option(False, help="generate the next rollout on the engines while the actor scores and "
                                           "trains on this one (one step off-policy: the engines hold the "
                                           "weights from before this step's update); the weight sync waits for it")
    router_replay: bool = option(False, help="MoE actor: its scoring and training forwards route every rollout token "
                                             "to the experts the vLLM engine routed it to (Megatron's routing "
                                             "replay), so the trainer's log-probs are of the network that sampled")
    freezing_actor_steps: int = option(0, help="train only the critic for the first N rollouts")
    policy_loss_type: str = option("ppo", help="the actor's policy loss, by name (engine/rl/policy_losses/registry.py; "
                                               "shipped: ppo, the clipped surrogate)")
    loss_agg_mode: LossAggMode = option("token-mean", help="how the policy and KL losses reduce their token losses "
                                                          "over the optimizer step (veRL's): token-mean, "
                                                          "seq-mean-token-sum, seq-mean-token-mean, "
                                                          "seq-mean-token-sum-norm (divisor --generate_max_len)")
    mask_truncated_completions: bool = option(False, help="leave responses that hit --generate_max_len out of the "
                                                          "actor's and critic's losses (and their normalisers)")
    ptx_coef: float = option(0.05, help="weight of the pretraining NLL in the actor loss (with --pretrain_data)")
    seed: int = 42  # the job's --seed
    skip_redundant_forwards: bool = True  # False: always score old log-probs (tests compare both ways)

    def __post_init__(self) -> None:
        samples = self.rollout_batch_size * self.n_samples_per_prompt
        if samples % self.train_batch_size:
            raise ValueError(
                f"--rollout_batch_size x --n_samples_per_prompt ({samples}) must be divisible by "
                f"--train_batch_size ({self.train_batch_size})"
            )
        if self.n_samples_per_prompt != self.advantage.n_samples_per_prompt:
            raise ValueError("--n_samples_per_prompt differs between the rollout and the advantage config")
        if self.ptx_coef < 0:
            raise ValueError(f"--ptx_coef must be >= 0, got {self.ptx_coef}")
        if self.eps_clip_low_high is not None and min(self.eps_clip_low_high) < 0:
            raise ValueError(f"--eps_clip_low_high must be two values >= 0, got {self.eps_clip_low_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"--dual_clip must be > 1.0, got {self.dual_clip}")
        if self.vllm_is_truncated_threshold <= 0:
            raise ValueError(f"--vllm_is_truncated_threshold must be > 0, got {self.vllm_is_truncated_threshold}")
        check_loss_agg_mode(self.loss_agg_mode)
        self._check_policy_loss_inputs()

    def _check_policy_loss_inputs(self) -> None:
        """Refuse a --policy_loss_type that needs what this run does not compute."""
        from engine.rl.policy_losses.registry import policy_loss_class

        needs = policy_loss_class(self.policy_loss_type).needs
        if "ref_log_probs" in needs and not self.needs_reference:
            raise ValueError(f"--policy_loss_type {self.policy_loss_type} needs the reference model's log-probs: "
                             f"set --init_kl_coef > 0")
        if "values" in needs and not self.needs_critic:
            raise ValueError(f"--policy_loss_type {self.policy_loss_type} needs the critic's values: "
                             f"--advantage_estimator gae")

    @property
    def clip_range(self) -> tuple[float, float]:
        """(low, high) clip of the policy ratio."""
        return self.eps_clip_low_high or (self.eps_clip, self.eps_clip)

    @property
    def needs_critic(self) -> bool:
        return self.advantage.estimator == "gae"

    @property
    def needs_reference(self) -> bool:
        return self.init_kl_coef > 0

    def needs_old_log_probs(self, *, reference: bool) -> bool:
        """Whether scoring must run the actor's forward for the rollout's old log-probs. Not when
        the rollout feeds exactly one optimizer step (the training forward's own log-probs are
        them) and nothing else reads them before training: no KL penalty in the reward, no
        adaptive KL controller fed by the rollout's KL."""
        one_step = self.max_epochs == 1 and self.rollout_batch_size * self.n_samples_per_prompt == self.train_batch_size
        kl_before_training = reference and (not self.use_kl_loss or self.kl_target is not None)
        # (--vllm_is_correction's weights then come from the training forward's log-probs.)
        return not (self.skip_redundant_forwards and one_step and not kl_before_training)


# Estimators whose baseline comes from the other samples of the same prompt.
GROUP_ESTIMATORS: tuple[str, ...] = ("reinforce_baseline", "rloo", "grpo", "dr_grpo")
