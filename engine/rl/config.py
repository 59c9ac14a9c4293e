"""The RL algorithm's options (``PPOConfig`` and its advantage estimator), declared apart from the
loop so that a job's parser imports neither torch nor megatron-core."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from engine.data.token_budget import TokenBudgetConfig
from parallel.options import option

LossAggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


LOSS_AGG_MODES: tuple[str, ...] = get_args(LossAggMode)


def check_loss_agg_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"--loss_agg_mode {mode!r} is not one of {', '.join(LOSS_AGG_MODES)}")


def check_overlong_buffer(buffer_len: int, max_len: int) -> None:
    if not 1 <= buffer_len < max_len:
        raise ValueError(f"--overlong_buffer_len ({buffer_len}) must be in [1, --generate_max_len) = [1, {max_len})")


ADVANTAGE_ESTIMATORS: tuple[str, ...] = ("gae", "reinforce", "reinforce_baseline", "rloo", "grpo", "dr_grpo")


# OpenRLHF calls GRPO's group normalisation "group_norm"; accept its flag value too.
ADVANTAGE_ESTIMATOR_ALIASES = {"group_norm": "grpo"}
PARTIAL_ROLLOUT_CHUNK = 32  # --partial_rollout_chunk's default: tokens per engine call of a resumable sample


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
    token_budget: TokenBudgetConfig = field(default_factory=TokenBudgetConfig)  # scoring and training micro-batches
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
    kl_estimator: Literal["k1", "k2", "k3", "low_var_kl"] = option(
        "k1", value_aliases={"use_kl_estimator_k3": "k3"},
        help="KL estimator of the reward penalty and of --use_kl_loss: k1, k2, k3, low_var_kl (veRL's k3 with the "
             "log-ratio clamped to [-20, 20] first)")
    normalize_reward: bool = option(False, help="reward models' rewards and the critic's values as (x - mean) / std "
                                                "with the mean / std in their config.json (OpenRLHF's; train_rm "
                                                "saves them)")
    normalize_reward_running: bool = option(False, help="normalise the rollout's rewards by their running mean / "
                                                        "std over the rollouts so far")
    dynamic_filtering: bool = option(False, help="DAPO's dynamic sampling: drop prompt groups whose rewards are all "
                                                 "equal (or whose mean leaves --dynamic_filtering_reward_range) and "
                                                 "generate more prompts until the rollout holds --rollout_batch_size "
                                                 "kept groups (at most --max_num_gen_batches rounds)")
    dynamic_filtering_reward_range: tuple[float, float] | None = option(
        None, help="with --dynamic_filtering, keep only groups whose mean reward is strictly inside LOW HIGH "
                   "(OpenRLHF's; e.g. 0 1 for 0/1 rewards)")
    max_num_gen_batches: int = option(10, help="with --dynamic_filtering, the most generation rounds (of "
                                               "--rollout_batch_size prompts each) one rollout may take; then it "
                                               "trains on the groups kept so far")
    nonfinite_reward_policy: Literal["error", "skip"] = option(
        "error", help="a NaN / inf reward from any source: error (naming the source and the sample) or skip "
                      "(drop that sample's prompt group from the rollout, counted as rollout/nonfinite_rewards)")
    vllm_is_correction: bool = option(False, aliases=("enable_vllm_is_correction",),
                                      help="weight each token's policy gradient by importance weights of the "
                                           "engines' mismatch with the trainer, exp(logp_actor - logp_vLLM), as "
                                           "--vllm_is_correction_type says (default: truncated at "
                                           "--vllm_is_truncated_threshold)")
    vllm_is_truncated_threshold: tuple[float, ...] = option(
        (2.0,), help="the --vllm_is_correction band: CAP (tis: weights min(w, CAP)) or LOW HIGH (OpenRLHF 0.11's; "
                     "tis clamps w to [LOW, HIGH], icepop and seq-mask-tis mask outside it)")
    vllm_is_correction_type: Literal["tis", "icepop", "seq-mask-tis"] = option(
        "tis", help="--vllm_is_correction's weights, w = exp(logp_actor - logp_vLLM) per token: tis (truncated: "
                    "clamped to the band), icepop (w, zero outside the band), seq-mask-tis (w, zero on every token "
                    "of a sequence whose geometric-mean w leaves the band); the masked fraction is logged")
    packing_samples: bool = option(False, help="pack each scoring / training micro-batch's prompt + response "
                                               "sequences into one row instead of padding them to the longest "
                                               "(the same losses; no compute on padding)")
    async_train: bool = option(False, help="generate the next rollout on the engines while the actor scores and "
                                           "trains on this one (one step off-policy: the engines hold the "
                                           "weights from before this step's update); the weight sync waits for it")
    max_staleness: int | None = option(None, help="with --async_train, fully asynchronous rollouts: generation runs "
                                                  "on a thread of its own, up to K rollouts ahead of training, and a "
                                                  "sample's oldest token is at most K actor updates old when it "
                                                  "trains (AReaL's admission rule: nothing is dropped, "
                                                  "--vllm_is_correction corrects); the sync waits only for the "
                                                  "engine call in flight")
    partial_rollout: bool = option(False, help="with --max_staleness, a weight sync interrupts unfinished samples "
                                               "(between engine calls of --partial_rollout_chunk tokens) and they "
                                               "resume from their token ids on the new weights; every token keeps "
                                               "the version and engine log-prob it was sampled with (multi-turn "
                                               "trajectories too: a turn is cut between two calls)")
    partial_rollout_chunk: int = option(PARTIAL_ROLLOUT_CHUNK,
                                        help="with --partial_rollout, the most tokens an engine call adds to a "
                                             "sample: how soon a weight sync interrupts generation")
    router_replay: bool = option(False, help="MoE actor: its scoring and training forwards route every rollout token "
                                             "to the experts the vLLM engine routed it to (Megatron's routing "
                                             "replay), so the trainer's log-probs are of the network that sampled")
    freezing_actor_steps: int = option(0, help="train only the critic for the first N rollouts")
    policy_loss_type: str = option("ppo", help="the actor's policy loss, by name (engine/rl/policy_losses/registry.py; "
                                               "shipped: ppo, the clipped surrogate; gspo, its sequence-level "
                                               "ratio (geometric mean over the response, clipped per sequence by "
                                               "--eps_clip / --eps_clip_low_high); cispo, the clipped, "
                                               "stop-gradient importance weight times the log-prob)")
    cispo_eps_clip_low: float = option(1.0, help="--policy_loss_type cispo: the weight's lower bound is 1 - this "
                                                 "(1.0: none, as MiniMax-M1)")
    cispo_eps_clip_high: float = option(0.28, help="--policy_loss_type cispo: the weight's upper bound is 1 + this")
    loss_agg_mode: LossAggMode | None = option(
        None, help="how the policy, KL and entropy losses reduce their token losses over the optimizer step "
                   "(veRL's): token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm (divisor "
                   "--generate_max_len) (default: token-mean; seq-mean-token-sum-norm, Dr. GRPO's, with "
                   "--advantage_estimator dr_grpo)")
    entropy_coef: float = option(0.0, aliases=("entropy_loss_coef",),
                                 help="entropy bonus: the actor loss minus this times the full-vocabulary token "
                                      "entropy, aggregated by --loss_agg_mode")
    overlong_buffer_len: int | None = option(None, help="DAPO's soft overlong penalty: a response longer than "
                                                        "--generate_max_len minus this many tokens loses "
                                                        "--overlong_penalty_factor x (its excess / this) reward")
    overlong_penalty_factor: float = option(1.0, help="the largest --overlong_buffer_len penalty (at "
                                                      "--generate_max_len tokens)")
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
        self._check_is_correction()
        if self.loss_agg_mode is not None:
            check_loss_agg_mode(self.loss_agg_mode)
        self._check_loss_options()
        self._check_dynamic_filtering()
        self._check_policy_loss_inputs()
        self._check_staleness()

    def _check_dynamic_filtering(self) -> None:
        if self.max_num_gen_batches < 1:
            raise ValueError(f"--max_num_gen_batches must be >= 1, got {self.max_num_gen_batches}")
        if self.dynamic_filtering_reward_range is not None:
            low, high = self.dynamic_filtering_reward_range
            if not low < high:
                raise ValueError(f"--dynamic_filtering_reward_range must be LOW HIGH with LOW < HIGH, got {low} {high}")
            if not self.dynamic_filtering:
                raise ValueError("--dynamic_filtering_reward_range applies with --dynamic_filtering: add it")
        if self.dynamic_filtering and self.n_samples_per_prompt < 2:
            raise ValueError("--dynamic_filtering compares the samples of a prompt: it needs --n_samples_per_prompt "
                             f"> 1, got {self.n_samples_per_prompt}")

    def _check_staleness(self) -> None:
        """--max_staleness / --partial_rollout: what they need, and what they do not combine with."""
        if self.max_staleness is not None:
            if self.max_staleness < 1:
                raise ValueError(f"--max_staleness must be >= 1 (actor updates a sample may lag), got {self.max_staleness}")
            if not self.async_train:
                raise ValueError("--max_staleness bounds the lag of rollouts generated while the actor trains: it "
                                 "needs --async_train")
            if self.dynamic_filtering:
                # Refills would draw prompt batches out of the stream's order, which the checkpoint's
                # prompt position (one count of batches) cannot express.
                raise ValueError("--max_staleness with --dynamic_filtering is not supported: the refill rounds "
                                 "draw prompt batches out of the order the stream admits them; drop one of the two")
        if self.partial_rollout and self.max_staleness is None:
            raise ValueError("--partial_rollout resumes samples across weight syncs of the fully asynchronous "
                             "rollouts: it needs --async_train --max_staleness K")
        if self.partial_rollout and self.router_replay:
            raise ValueError("--partial_rollout with --router_replay is not supported: a resumed sample's routing "
                             "would come from several engine calls; drop one of the two")
        if self.partial_rollout_chunk < 1:
            raise ValueError(f"--partial_rollout_chunk must be >= 1, got {self.partial_rollout_chunk}")
        if self.partial_rollout_chunk != PARTIAL_ROLLOUT_CHUNK and not self.partial_rollout:
            raise ValueError("--partial_rollout_chunk sizes the engine calls of --partial_rollout: pass "
                             "--partial_rollout too")

    def _check_is_correction(self) -> None:
        band = self.vllm_is_truncated_threshold
        if len(band) not in (1, 2) or min(band) < 0 or band[-1] <= 0 or (len(band) == 2 and band[0] > band[1]):
            raise ValueError("--vllm_is_truncated_threshold takes CAP > 0 or LOW HIGH with 0 <= LOW <= HIGH, "
                             f"got {' '.join(map(str, band))}")
        if self.vllm_is_correction_type != "tis" and not self.vllm_is_correction:
            raise ValueError(f"--vllm_is_correction_type {self.vllm_is_correction_type} without --vllm_is_correction: "
                             "no weights are applied; pass both")
        if self.vllm_is_correction_type != "tis" and len(band) != 2:
            raise ValueError(f"--vllm_is_correction_type {self.vllm_is_correction_type} masks outside a band: pass "
                             "--vllm_is_truncated_threshold LOW HIGH (OpenRLHF's default: 0.5 5.0)")

    def _check_loss_options(self) -> None:
        if self.entropy_coef < 0:
            raise ValueError(f"--entropy_coef must be >= 0, got {self.entropy_coef}")
        if self.cispo_eps_clip_low < 0 or self.cispo_eps_clip_high < 0:
            raise ValueError("--cispo_eps_clip_low and --cispo_eps_clip_high must be >= 0, got "
                             f"{self.cispo_eps_clip_low} and {self.cispo_eps_clip_high}")
        if self.dual_clip is not None and self.policy_loss_type != "ppo":
            raise ValueError(f"--dual_clip bounds PPO's token surrogate; --policy_loss_type {self.policy_loss_type} "
                             "has none")
        if self.policy_loss_type != "cispo" and (self.cispo_eps_clip_low, self.cispo_eps_clip_high) != (1.0, 0.28):
            raise ValueError("--cispo_eps_clip_low / --cispo_eps_clip_high bound --policy_loss_type cispo's weights; "
                             f"this run's loss is {self.policy_loss_type} (its clip: --eps_clip / --eps_clip_low_high)")
        if self.overlong_buffer_len is None and self.overlong_penalty_factor != 1.0:
            raise ValueError("--overlong_penalty_factor scales the --overlong_buffer_len penalty: pass "
                             "--overlong_buffer_len too")
        if self.overlong_buffer_len is not None and self.overlong_buffer_len < 1:
            raise ValueError(f"--overlong_buffer_len must be >= 1, got {self.overlong_buffer_len}")
        if self.overlong_penalty_factor < 0:
            raise ValueError(f"--overlong_penalty_factor must be >= 0, got {self.overlong_penalty_factor}")

    @property
    def aggregation_mode(self) -> str:
        """--loss_agg_mode, or its default: Dr. GRPO's seq-mean-token-sum-norm under --advantage_estimator
        dr_grpo (its unbiased loss needs the constant divisor, not only the baseline), else token-mean."""
        if self.loss_agg_mode is not None:
            return self.loss_agg_mode
        return "seq-mean-token-sum-norm" if self.advantage.estimator == "dr_grpo" else "token-mean"

    @property
    def is_correction_band(self) -> tuple[float, float]:
        """(low, high) of the --vllm_is_correction weights (one value: (0, CAP))."""
        band = self.vllm_is_truncated_threshold
        return (0.0, band[0]) if len(band) == 1 else (band[0], band[1])

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


@dataclass(kw_only=True)
class DoctorConfig:
    """The mismatch doctor (docs/jobs.md): trainer vs engine, layer by layer, on the same tokens."""

    doctor_every: int = option(0, help="every N rollouts (0: never), right after the weight sync, run the mismatch "
                                       "doctor: the same tokens through the actor and vLLM engine 0; per-layer "
                                       "hidden-state differences, the first layer whose difference jumps, MoE "
                                       "routing differences, log-prob difference; a table on the console and "
                                       "<run_dir>/doctor/step_N.json")
    doctor_samples: int = option(2, help="sequences of the rollout the doctor runs (prompt + response)")
    doctor_jump_factor: float = option(10.0, help="a layer 'jumps' when its relative hidden-state difference "
                                                  "exceeds this times that of every layer before it (and the "
                                                  "dtype's noise floor)")

    def __post_init__(self) -> None:
        if self.doctor_every < 0:
            raise ValueError(f"--doctor_every must be >= 0, got {self.doctor_every}")
        if self.doctor_samples < 1:
            raise ValueError(f"--doctor_samples must be positive, got {self.doctor_samples}")
        if not self.doctor_jump_factor > 1.0:
            raise ValueError(f"--doctor_jump_factor must be > 1, got {self.doctor_jump_factor}")

    def due(self, step: int) -> bool:
        """Whether rollout ``step`` (1-based) is diagnosed."""
        return self.doctor_every > 0 and step % self.doctor_every == 0
