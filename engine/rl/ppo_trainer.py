"""The RL loop on Ray: generate -> score -> advantages -> train -> sync, one rollout per step.

The driver holds references and small tensors only; the models live in the role groups
(Megatron worlds of Ray actors) and the vLLM engines.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.rl.advantages import (
    AdvantageConfig,
    AdvantageInputs,
    RunningMoments,
    compute_advantages,
    filter_all_equal_groups,
)
from engine.rl.kl import kl_estimate, make_kl_controller
from engine.rl.sequences import RolloutBatch, build_rollout_batch


@dataclass(kw_only=True)
class PPOConfig:
    """The RL algorithm's flags (OpenRLHF names)."""

    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    rollout_batch_size: int = 8  # prompts per rollout
    n_samples_per_prompt: int = 1
    train_batch_size: int = 8  # samples per optimizer step
    micro_train_batch_size: int = 4
    micro_rollout_batch_size: int = 8  # samples per forward micro-batch when scoring
    max_epochs: int = 1  # PPO epochs per rollout
    num_episodes: int = 1
    max_steps: int | None = None  # rollouts to run (default: the prompt set over num_episodes)
    eps_clip: float = 0.2
    value_clip: float | None = 0.2
    init_kl_coef: float = 0.01
    kl_target: float | None = None
    kl_horizon: int = 10000
    use_kl_loss: bool = False  # KL as a loss term (GRPO style) instead of a reward penalty
    kl_estimator: str = "k1"
    normalize_reward: bool = False
    dynamic_filtering: bool = False  # drop GRPO groups whose rewards are all equal
    freezing_actor_steps: int = 0  # train only the critic for the first N rollouts
    ptx_coef: float = 0.05  # weight of the pretraining NLL in the actor loss (with --pretrain_data)
    temperature: float = 1.0
    seed: int = 42

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

    @property
    def needs_critic(self) -> bool:
        return self.advantage.estimator == "gae"

    @property
    def needs_reference(self) -> bool:
        return self.init_kl_coef > 0


@dataclass
class Timer:
    seconds: dict = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[f"time/{name}"] = time.perf_counter() - start


class PPOTrainer:
    """Owns the loop; the roles, engines and reward sources are built by the CLI and passed in."""

    def __init__(self, config: PPOConfig, *, prompts, tokenizer, engines, actor, sampling, sync,
                 critic=None, reference=None, reward_models=(), reward_sources=(), logger=None,
                 checkpoint=None, save_path: str | None = None, save_value_network: bool = False,
                 pretrain_samples=None, engines_sleep: bool = False):
        """``engines_sleep`` (--vllm_enable_sleep): the engines release their GPU memory after each
        generation and take it back just before the weight sync."""
        self.config = config
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.engines = engines
        self.engines_sleep = engines_sleep
        self.actor, self.critic, self.reference = actor, critic, reference
        self.reward_models, self.reward_sources = list(reward_models), list(reward_sources)
        self.sampling = sampling
        self.sync = sync  # engine.ray.weight_sync.ActorWeightSync
        self.logger = logger
        self.checkpoint = checkpoint
        self.save_path = save_path
        self.save_value_network = save_value_network
        self.kl_controller = make_kl_controller(init_kl_coef=config.init_kl_coef, kl_target=config.kl_target,
                                                kl_horizon=config.kl_horizon)
        self.reward_moments = RunningMoments()
        self.ptx = None  # the pretraining samples of --pretrain_data, drawn per rollout
        if pretrain_samples is not None and config.ptx_coef > 0:
            from engine.rl.ptx import PtxSampler

            self.ptx = PtxSampler(pretrain_samples, seed=config.seed,
                                  stride=config.max_epochs * config.rollout_batch_size * config.n_samples_per_prompt)
        self.history: list[dict] = []
        steps_per_episode = len(prompts) // config.rollout_batch_size
        if steps_per_episode == 0:
            raise ValueError(f"--prompt_data has {len(prompts)} prompts, fewer than --rollout_batch_size "
                             f"({config.rollout_batch_size})")
        self.steps_per_episode = steps_per_episode
        self.num_steps = min(steps_per_episode * config.num_episodes, config.max_steps or 1 << 62)

    # ----- the loop -----------------------------------------------------------------------
    def fit(self) -> list[dict]:
        start = self._resume()
        for step in range(start, self.num_steps):
            metrics = self.train_one_rollout(step)
            self.history.append({"step": step + 1, **metrics})
            self._report(step + 1, metrics)
            self._maybe_checkpoint(step + 1)
        if self.save_path:
            self.actor.run(lambda w: w.save_hf.remote(f"{self.save_path}"), "HF export")
            if self.critic is not None and self.save_value_network:
                self.critic.run(lambda w: w.save_hf.remote(f"{self.save_path}_critic"), "HF export")
        return self.history

    def train_one_rollout(self, step: int) -> dict:
        timer = Timer()
        started = time.perf_counter()
        rows = self._prompt_rows(step)
        with timer.phase("generate"):
            batch, samples_meta = self.generate(rows, step)
            if self.engines_sleep:
                from engine.ray.vllm_engine import sleep_engines

                sleep_engines(self.engines)
        with timer.phase("score"):
            scored = self.score(batch, samples_meta)
        with timer.phase("advantages"):
            experience, adv_metrics = self.advantages(batch, scored)
        with timer.phase("train"):
            train_metrics = self.train(experience, step)
        with timer.phase("sync"):
            if self.engines_sleep:
                from engine.ray.vllm_engine import wake_up_engines

                wake_up_engines(self.engines)
            sync_metrics = self.sync.push()
        timer.seconds["time/step"] = time.perf_counter() - started
        return {**scored["metrics"], **adv_metrics, **train_metrics, **sync_metrics, **timer.seconds}

    # ----- phases -------------------------------------------------------------------------
    def _prompt_rows(self, step: int) -> list[dict]:
        episode, index = divmod(step, self.steps_per_episode)
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.config.seed + episode))
        chosen = order[index * self.config.rollout_batch_size:(index + 1) * self.config.rollout_batch_size]
        return [self.prompts[int(i)] for i in chosen]

    def generate(self, rows: list[dict], step: int) -> tuple[RolloutBatch, dict]:
        from dataclasses import replace

        from engine.ray.vllm_engine import generate

        sampling = replace(self.sampling, seed=self.config.seed + step * 100003)
        samples = generate(self.engines, [list(r["prompt_ids"]) for r in rows], sampling)
        prompt_ids = [list(rows[s.prompt_index]["prompt_ids"]) for s in samples]
        batch = build_rollout_batch(
            prompt_ids, [s.response_token_ids for s in samples], pad_id=self._pad_id(),
            response_log_probs=[s.logprobs or [0.0] * len(s.response_token_ids) for s in samples],
        )
        meta = {
            "prompts": [rows[s.prompt_index]["prompt"] for s in samples],
            "responses": self.tokenizer.batch_decode([s.response_token_ids for s in samples], skip_special_tokens=True),
            "labels": [rows[s.prompt_index]["label"] for s in samples],
            "truncated": sum(s.finish_reason == "length" for s in samples),
        }
        return batch, meta

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def score(self, batch: RolloutBatch, meta: dict) -> dict:
        micro = self.config.micro_rollout_batch_size
        inputs = {**batch.model_inputs(), "last_index": batch.last_token_index()}
        temperature = self.config.temperature
        old_log_probs = self.actor.per_sample(lambda w, b: w.compute_log_probs.remote(b, micro, temperature),
                                              inputs, "actor log-probs")
        ref_log_probs = None
        if self.reference is not None:
            ref_log_probs = self.reference.per_sample(lambda w, b: w.compute_log_probs.remote(b, micro, temperature),
                                                      inputs, "reference log-probs")
        values = None
        if self.critic is not None:
            values = self.critic.per_sample(lambda w, b: w.compute_values.remote(b, micro), inputs, "critic values")
        rewards = self._rewards(inputs, meta)
        mask = batch.action_mask
        metrics = {
            "reward": float(rewards.mean()),
            "response_length": float(batch.response_lengths.float().mean()),
            "truncated_ratio": meta["truncated"] / batch.batch_size,
        }
        if batch.rollout_log_probs is not None:
            # Training-inference mismatch: vLLM's log-probs vs the Megatron actor's, same tokens.
            diff = (batch.rollout_log_probs - old_log_probs).abs() * mask
            metrics["rollout_logprob_abs_diff"] = float(diff.sum() / mask.sum().clamp(min=1))
        return {"old_log_probs": old_log_probs, "ref_log_probs": ref_log_probs, "values": values,
                "rewards": rewards, "metrics": metrics}

    def _rewards(self, inputs: dict, meta: dict) -> torch.Tensor:
        from engine.rl.rewards import combine_rewards

        per_source = [
            group.per_sample(lambda w, b: w.compute_rewards.remote(b, self.config.micro_rollout_batch_size),
                             inputs, "reward model").tolist()
            for group in self.reward_models
        ]
        per_source += [src.score(meta["prompts"], meta["responses"], meta["labels"]) for src in self.reward_sources]
        if not per_source:
            raise ValueError("no reward source: pass --reward_pretrain and/or --remote_rm_url")
        return torch.tensor(combine_rewards(per_source), dtype=torch.float32)

    def advantages(self, batch: RolloutBatch, scored: dict) -> tuple[dict, dict]:
        config = self.config
        rewards = scored["rewards"]
        if config.normalize_reward:
            self.reward_moments.update(rewards)
            rewards = self.reward_moments.normalize(rewards)
        mask = batch.action_mask
        kl = None
        metrics = {}
        if scored["ref_log_probs"] is not None:
            kl = kl_estimate(scored["old_log_probs"], scored["ref_log_probs"], estimator=config.kl_estimator,
                             action_mask=mask)
            metrics["kl"] = float((kl * mask).sum() / mask.sum().clamp(min=1))
        reward_kl_coef = 0.0 if config.use_kl_loss else self.kl_controller.value
        advantages, returns = compute_advantages(
            AdvantageInputs(rewards=rewards, action_mask=mask, kl=kl, kl_coef=reward_kl_coef, values=scored["values"]),
            config.advantage,
        )
        if metrics.get("kl") is not None:
            self.kl_controller.update(metrics["kl"], batch.batch_size)
        metrics["kl_coef"] = self.kl_controller.value
        experience = {
            **batch.model_inputs(),
            "old_log_probs": scored["old_log_probs"], "advantages": advantages, "returns": returns,
        }
        if scored["ref_log_probs"] is not None:
            experience["ref_log_probs"] = scored["ref_log_probs"]
        if scored["values"] is not None:
            experience["values"] = scored["values"]
        if config.dynamic_filtering:
            keep = filter_all_equal_groups(scored["rewards"], config.n_samples_per_prompt)
            metrics["filtered_ratio"] = 1.0 - float(keep.float().mean())
            experience = self._keep_rows(experience, keep)
        metrics["advantage_abs_mean"] = float((advantages.abs() * mask).sum() / mask.sum().clamp(min=1))
        return experience, metrics

    def _keep_rows(self, experience: dict, keep: torch.Tensor) -> dict:
        """Keep a multiple of --train_batch_size rows, preferring the informative ones."""
        order = torch.argsort((~keep).to(torch.int8), stable=True)
        num_keep = max(int(keep.sum()) // self.config.train_batch_size, 1) * self.config.train_batch_size
        rows = order[:num_keep]
        return {k: v[rows] for k, v in experience.items()}

    def train(self, experience: dict, step: int) -> dict:
        settings = {
            "train_batch_size": self.config.train_batch_size,
            "micro_train_batch_size": self.config.micro_train_batch_size,
            "max_epochs": self.config.max_epochs,
            "seed": self.config.seed + step,
            "eps_clip": self.config.eps_clip,
            "value_clip": self.config.value_clip,
            "temperature": self.config.temperature,
            "kl_loss_coef": self.kl_controller.value if self.config.use_kl_loss else 0.0,
            "kl_estimator": self.config.kl_estimator,
            "ptx_coef": self.config.ptx_coef if self.ptx is not None else 0.0,
            "pad_token_id": self._pad_id(),
        }
        metrics = {}
        ref = None
        if self.critic is not None:
            import ray

            ref = ray.put(experience)
            critic = self.critic.run(lambda w: w.train.remote(ref, loss="value", settings=settings), "critic train")
            metrics.update({f"critic/{k}": v for k, v in critic[0].items()})
        if step >= self.config.freezing_actor_steps:
            ptx = self._ptx_rows(step, len(experience["input_ids"]))
            actor = self.actor.run(lambda w: w.train.remote(ref if ref is not None else experience, loss="policy",
                                                            settings=settings, ptx=ptx), "actor train")
            metrics.update({f"actor/{k}": v for k, v in actor[0].items()})
        return metrics

    def _ptx_rows(self, step: int, num_rows: int):
        """One pretraining sample per rollout sample of every optimizer step (OpenRLHF pairs one
        ptx micro-batch with each actor micro-batch), padded; None without --pretrain_data."""
        if self.ptx is None:
            return None
        import ray

        from engine.rl.ptx import collate_ptx

        per_step = self.config.train_batch_size
        num = self.config.max_epochs * (num_rows // per_step) * per_step
        return ray.put(collate_ptx(self.ptx.samples(step, num), pad_id=self._pad_id()))

    # ----- bookkeeping --------------------------------------------------------------------
    def _report(self, step: int, metrics: dict) -> None:
        shown = ("reward", "response_length", "kl", "actor/policy_loss", "actor/grad_norm", "actor/num_tokens",
                 "actor/approx_kl", "actor/ptx_loss", "advantage_abs_mean", "rollout_logprob_abs_diff",
                 "time/generate", "time/score", "time/train", "time/sync")
        line = " ".join(f"{k}={metrics[k]:.4g}" for k in shown if k in metrics)
        print(f"rollout {step}/{self.num_steps} {line}", flush=True)
        if self.logger is not None:
            self.logger.log(metrics, step)

    def _state(self, step: int) -> dict:
        return {"step": step, "kl_coef": self.kl_controller.value,
                "reward_moments": self.reward_moments.state()}

    def _maybe_checkpoint(self, step: int) -> None:
        ckpt = self.checkpoint
        if ckpt is None or not ckpt.ckpt_path or ckpt.save_steps <= 0:
            return
        if step % ckpt.save_steps and step != self.num_steps:
            return
        from dataclasses import replace

        state = self._state(step)
        self.actor.run(lambda w: w.save_checkpoint.remote(replace(ckpt, ckpt_path=f"{ckpt.ckpt_path}/actor"), step, state),
                       "actor checkpoint")
        if self.critic is not None:
            self.critic.run(lambda w: w.save_checkpoint.remote(replace(ckpt, ckpt_path=f"{ckpt.ckpt_path}/critic"),
                                                              step, state), "critic checkpoint")

    def _resume(self) -> int:
        ckpt = self.checkpoint
        if ckpt is None or not ckpt.load_checkpoint:
            return 0
        from dataclasses import replace

        states = self.actor.run(lambda w: w.resume.remote(replace(ckpt, ckpt_path=f"{ckpt.ckpt_path}/actor")), "resume")
        state = states[0]
        if state is None:
            return 0
        if self.critic is not None:
            self.critic.run(lambda w: w.resume.remote(replace(ckpt, ckpt_path=f"{ckpt.ckpt_path}/critic")), "resume")
        self.kl_controller.value = state["kl_coef"]
        self.reward_moments.merge(*state["reward_moments"])
        self.sync.push()  # the engines still hold the initial weights
        print(f"resumed the RL run at rollout {state['step']}", flush=True)
        return state["step"]


def save_run_config(path: str, config: PPOConfig) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / "ppo_config.json").write_text(json.dumps(asdict(config), indent=1, default=str))
