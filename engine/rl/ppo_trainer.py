"""The RL loop: generate -> score -> advantages -> train -> sync, one rollout per step.

The loop is given its pieces (built by ``engine.cli.train_ppo_ray``): the rollout engines
(``engine.rl.rollout.RolloutEngines``), the roles (``RoleGroup``s: typed calls on Megatron
worlds of Ray actors) and the reward sources. It holds references and small tensors only.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from engine.data.position import check_prompt_position, prompt_position, resumed_generation_batches
from engine.data.token_budget import check_fits
from engine.rl.advantages import AdvantageInputs, RunningMoments, compute_advantages, per_turn_rewards
from engine.rl.agents.executor import agent_metrics
from engine.rl.config import PPOConfig  # noqa: F401  (declared apart: the parsers import no torch)
from engine.rl.console import RolloutProgress
from engine.rl.doctor import MismatchDoctor
from engine.rl.dynamic_sampling import KeptGroups, kept_groups
from engine.rl.evaluation import RLEvalConfig, eval_metrics
from engine.rl.experience import Experience
from engine.rl.kl import kl_estimate, make_kl_controller
from engine.rl.ptx import PtxSampler, collate_ptx
from engine.rl.reward_shaping import overlong_penalty
from engine.rl.rewards import combine_rewards, nonfinite_reward_error, nonfinite_rewards
from engine.rl.rollout import RolloutEngines, SamplingConfig, rollout_loss_masks
from engine.rl.rollout_stream import RolloutStream, staleness_metrics
from engine.rl.sequences import RolloutBatch, build_rollout_batch
from engine.rl.train_losses import ROLLOUT_METRICS, TrainSettings


@dataclass(kw_only=True)
class PrefetchedRollout:
    """One rollout's generation: submitted to the engines, then its batch once ``wait`` returns."""

    step: int
    generation_batch: int  # which batch of --rollout_batch_size prompts of the prompt stream (_prompt_rows)
    rows: list[dict]
    pending: object  # engine.rl.rollout.PendingRollout
    # Actor updates the engines' weights held when it was submitted; --max_staleness: when its oldest
    # token was sampled (the stream starts it later, or resumes it on newer weights).
    weights_version: int
    samples: list | None = None  # the engines' RolloutSamples, once collected
    batch: RolloutBatch | None = None  # None after --dynamic_filtering kept no group
    meta: dict | None = None


@dataclass
class Timer:
    seconds: dict = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[f"time/{name}"] = time.perf_counter() - start


class RolloutAbandoned(Exception):
    """A stop was requested before this rollout trained anything: it is dropped, nothing changed.
    ``first_batch``: its first prompt batch, where the run continues (a resume generates it anew)."""

    def __init__(self, first_batch: int):
        super().__init__(first_batch)
        self.first_batch = first_batch


class PPOTrainer:
    """Owns the loop; the roles, rollout engines and reward sources are built by the CLI and passed in.

    ``actor`` / ``critic`` / ``reference`` / ``reward_models`` offer the ``RoleGroup`` calls
    (``log_probs``, ``values``, ``rewards``, ``train``, ``save_checkpoint``, ``resume``,
    ``save_hf``); ``rollouts`` generates and takes the actor's weights."""

    def __init__(self, config: PPOConfig, *, prompts, tokenizer, rollouts: RolloutEngines, actor,
                 sampling: SamplingConfig, critic=None, reference=None, reward_models=(), reward_sources=(),
                 logger=None, checkpoint=None, save_path: str | None = None, save_value_network: bool = False,
                 save_hf_ckpt: bool = False,
                 pretrain_samples=None, evaluation: RLEvalConfig | None = None, eval_prompts=None,
                 record=None, doctor: MismatchDoctor | None = None, preemption=None,
                 save_on_preempt: bool = False, turn_rewards: bool = False):
        self.config = config
        self.turn_rewards = turn_rewards  # --turn_rewards per_turn: each turn's reward on its own last token
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.rollouts = rollouts
        self.actor, self.critic, self.reference = actor, critic, reference
        self.reward_models, self.reward_sources = list(reward_models), list(reward_sources)
        self.sampling = sampling
        self.logger = logger
        self.checkpoint = checkpoint
        self.save_path = save_path
        self.save_value_network = save_value_network
        self.save_hf_ckpt = save_hf_ckpt  # an HF export beside each checkpoint
        self.kl_controller = make_kl_controller(init_kl_coef=config.init_kl_coef, kl_target=config.kl_target,
                                                kl_horizon=config.kl_horizon)
        self.reward_moments = RunningMoments()
        self.ptx = None  # the pretraining samples of --pretrain_data, drawn per rollout
        if pretrain_samples is not None and config.ptx_coef > 0:
            self.ptx = PtxSampler(pretrain_samples, seed=config.seed,
                                  stride=config.max_epochs * config.rollout_batch_size * config.n_samples_per_prompt)
        self.record = record  # engine.rl.console.RunRecord: metrics.jsonl and reward.png of the run directory
        self.doctor = doctor  # --doctor_every: trainer vs engine, layer by layer, after the sync of its rollouts
        self.progress = None
        self.evaluation = evaluation or RLEvalConfig()
        self.eval_prompts = eval_prompts
        if self.evaluation.eval_dataset and not eval_prompts:
            raise ValueError(f"--eval_dataset {self.evaluation.eval_dataset} has no prompts")
        self.history: list[dict] = []
        # parallel.preemption.PreemptionWatch: a signal asks the loop to stop at its next safe point.
        self.preemption, self.save_on_preempt = preemption, save_on_preempt
        self._saved_step = 0  # the newest rollout a checkpoint holds (0: none)
        # Optimizer updates of the actor so far, and how many of them the engines' weights hold.
        self.actor_version = self.engines_version = 0
        # --async_train: the next rollouts, generating or ready, in step order (one; up to --max_staleness).
        self._ahead: list[PrefetchedRollout] = []
        self._stream: RolloutStream | None = None  # --max_staleness: generation on a thread of its own
        # Batches of --rollout_batch_size prompts drawn from the prompt stream so far: one per rollout,
        # more when --dynamic_filtering refills a rollout (the checkpoint's prompt position).
        self.generation_batches = 0
        steps_per_episode = len(prompts) // config.rollout_batch_size
        if steps_per_episode == 0:
            raise ValueError(f"--prompt_data has {len(prompts)} prompts, fewer than --rollout_batch_size "
                             f"({config.rollout_batch_size})")
        self.steps_per_episode = steps_per_episode
        self.num_steps = min(steps_per_episode * config.num_episodes, config.max_steps or 1 << 62)

    # ----- the loop -----------------------------------------------------------------------
    def fit(self) -> list[dict]:
        start = self._saved_step = self._resume()
        self._use_machine_cores()
        self.progress = RolloutProgress(self.num_steps, start)
        try:
            for step in range(start, self.num_steps):
                if self._stop_requested():
                    self._stop(step)
                try:
                    metrics = self.train_one_rollout(step)
                except RolloutAbandoned as abandoned:
                    # Its prompt batches (and a prefetched next rollout's) go back to the stream.
                    self.generation_batches, self._ahead = abandoned.first_batch, []
                    self._close_stream()
                    self._stop(step)
                if self.evaluation.due(step + 1, self.num_steps) and not self._stop_requested():
                    metrics.update(self.evaluate(step + 1))
                self.history.append({"step": step + 1, **metrics})
                self._report(step + 1, metrics)
                self._maybe_checkpoint(step + 1)
                self.progress.advance()
        finally:
            self._close_stream()
            self.progress.close()
            if self.record is not None and self.history:
                self.record.plot(self.history)
        if self.save_path:
            self.actor.save_hf(self.save_path)
            if self.critic is not None and self.save_value_network:
                self.critic.save_hf(f"{self.save_path}_critic")
        return self.history

    def _roles(self) -> dict:
        roles = {"actor": self.actor, "critic": self.critic, "ref": self.reference}
        roles.update({f"reward{i}": group for i, group in enumerate(self.reward_models)})
        return {name: group for name, group in roles.items() if group is not None}

    def _use_machine_cores(self) -> None:
        """The roles score and train one at a time: on CPU each role's ranks compute with all of
        their node's cores (``engine.ray.cpu_threads``)."""
        threads = {name: min(group.use_machine_cores()) for name, group in self._roles().items()}
        print("torch threads per rank while scoring / training: "
              + ", ".join(f"{name} {count}" for name, count in threads.items()), flush=True)

    def train_one_rollout(self, step: int) -> dict:
        timer = Timer()
        started = time.perf_counter()
        with timer.phase("generate"):
            rollout = self._take_rollout(step)
            self.rollouts.release_memory()
        self._abandon_if_stopping(rollout)
        self._admit_ahead(step)  # --async_train: generates while this rollout trains
        adv_metrics = train_metrics = {}
        if rollout.batch is None:  # --dynamic_filtering kept no group in its rounds
            experience, metrics = None, dict(rollout.meta["refill"])
        else:
            with timer.phase("score"):
                experience, rewards, metrics = self.score(rollout.batch, rollout.meta)
        self._abandon_if_stopping(rollout)  # the phases from here on change the run's state: they finish
        metrics["rollout/staleness"] = self.actor_version - rollout.weights_version
        if self.config.max_staleness is not None and rollout.samples:
            metrics.update(staleness_metrics(rollout.samples, self.actor_version, self.config.max_staleness))
        if experience is not None and experience.batch_size >= self.config.train_batch_size:
            with timer.phase("advantages"):
                experience, adv_metrics = self.advantages(experience, rewards)
            with timer.phase("train"):
                train_metrics = self.train(experience, step)
        else:  # dropped groups (non-finite rewards, --dynamic_filtering) left less than one optimizer step
            print(f"warning: rollout {step + 1}: {experience.batch_size if experience is not None else 0} samples "
                  f"left after dropping groups, fewer than --train_batch_size {self.config.train_batch_size}: no "
                  "training on this rollout", flush=True)
        sync_metrics = self._sync(timer)
        if self._stream is not None:  # the engines hold this step's update: one more rollout may start now
            self._admit_ahead(step, synced=True)
        if self.doctor is not None and self.doctor.due(step + 1) and rollout.batch is not None:
            with timer.phase("doctor"):  # both sides hold the same weights now
                sync_metrics.update(self.doctor.run(step + 1, self._doctor_sequences(rollout.batch)))
        timer.seconds["time/step"] = time.perf_counter() - started
        return {**metrics, **adv_metrics, **train_metrics, **sync_metrics, **timer.seconds}

    def _sync(self, timer: Timer) -> dict:
        """The weight sync, once the engines are between calls: after the prefetched rollout
        (--async_train), after the stream's call in flight (--max_staleness), else at once."""
        if self._stream is not None:
            started = time.perf_counter()
            sync_metrics, waited = self._stream.sync(self.rollouts.sync_weights, version=self.actor_version)
            timer.seconds["time/generate_wait"] = waited
            timer.seconds["time/sync"] = time.perf_counter() - started - waited
        else:
            if self._ahead:
                with timer.phase("generate_wait"):  # the engines must be done before their weights change
                    for ahead in self._ahead:
                        self._collect(ahead)
            with timer.phase("sync"):
                sync_metrics = self.rollouts.sync_weights()
        self.engines_version = self.actor_version
        return sync_metrics

    def _admit_ahead(self, step: int, *, synced: bool = False) -> None:
        """--async_train: submit the rollouts after ``step`` that may generate now, K = --max_staleness
        (1 without it) ahead of the rollouts whose updates the engines hold: those before ``step``, and
        ``step``'s too once ``synced``. AReaL's admission rule: a rollout started now trains at most K
        actor updates later (one update per rollout at most)."""
        if not self.config.async_train:
            return
        last = min(self.num_steps - 1, step + int(synced) + (self.config.max_staleness or 1))
        first = self._ahead[-1].step + 1 if self._ahead else step + 1
        self._ahead += [self._submit(s) for s in range(first, last + 1)]

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _doctor_sequences(self, batch: RolloutBatch) -> list[list[int]]:
        """The first ``--doctor_samples`` rows of the rollout, prompt + response, without padding."""
        count = min(self.doctor.config.doctor_samples, batch.batch_size)
        last = batch.last_token_index()
        return [batch.input_ids[i, :int(last[i]) + 1].tolist() for i in range(count)]

    def _submit(self, step: int) -> PrefetchedRollout:
        """Start generating the next batch of the prompt stream for rollout ``step``."""
        index = self.generation_batches
        self.generation_batches += 1
        rows = self._prompt_rows(index)
        prompt_ids = [list(r["prompt_ids"]) for r in rows]
        if self.config.max_staleness is not None:
            if self._stream is None:
                self._stream = RolloutStream(self.rollouts, version=self.engines_version,
                                             chunk=self.config.partial_rollout_chunk if self.config.partial_rollout
                                             else None)
            pending = self._stream.admit(prompt_ids, self._sampling(index), rows=rows)
        else:
            pending = self.rollouts.generate_async(prompt_ids, self._sampling(index), rows=rows)
        return PrefetchedRollout(step=step, generation_batch=index, rows=rows, pending=pending,
                                 weights_version=self.engines_version)

    def _sampling(self, generation_batch: int) -> SamplingConfig:
        # A function of the prompt batch alone (the rollout's step, without --dynamic_filtering refills).
        return replace(self.sampling, seed=self.config.seed + generation_batch * 100003)

    def _take_rollout(self, step: int) -> PrefetchedRollout:
        """This step's rollout: generated during the previous step (--async_train), else now."""
        if self._ahead and self._ahead[0].step == step:
            prefetched = self._ahead.pop(0)
        else:
            prefetched = self._submit(step)
        self._collect(prefetched)
        if self.config.dynamic_filtering:
            self._refill(prefetched)
        return prefetched

    def _collect(self, rollout: PrefetchedRollout) -> None:
        """Wait for ``rollout``'s samples (once) and batch them."""
        if rollout.samples is None:
            rollout.samples = rollout.pending.result()
            versions = [min(s.token_versions) for s in rollout.samples if s.token_versions]
            if versions:  # --max_staleness: the oldest weights that sampled a token of this rollout
                rollout.weights_version = min(versions)
            rollout.batch, rollout.meta = self.to_batch(rollout.rows, rollout.samples)

    def _refill(self, rollout: PrefetchedRollout) -> None:
        """--dynamic_filtering (DAPO's dynamic sampling): ``rollout`` becomes its first
        --rollout_batch_size informative groups (``engine.rl.dynamic_sampling``), generating more
        batches of the prompt stream until it has them or --max_num_gen_batches rounds are spent.
        The rewards of the kept groups go with the batch, for ``score`` to use."""
        config, target = self.config, self.config.rollout_batch_size
        kept = KeptGroups(config.n_samples_per_prompt)
        current = rollout
        while True:
            rewards = self._rewards(Experience.from_rollout(current.batch), current.meta, config.n_samples_per_prompt)
            keep = kept_groups(rewards, config.n_samples_per_prompt, config.dynamic_filtering_reward_range)
            kept.add_round(current.rows, current.samples, rewards, keep)
            if kept.num_kept >= target or kept.num_rounds >= config.max_num_gen_batches:
                break
            current = self._submit(rollout.step)
            self._collect(current)
        rows, samples, rewards = kept.rollout(target)
        refill = kept.metrics(target)
        if config.nonfinite_reward_policy == "skip":
            refill["rollout/nonfinite_rewards"] = kept.num_nonfinite
        if kept.num_kept < target:
            print(f"warning: rollout {rollout.step + 1}: {kept.num_kept} of --rollout_batch_size {target} prompt "
                  f"groups kept after --max_num_gen_batches {config.max_num_gen_batches} rounds "
                  f"({kept.num_generated} generated): training on the {kept.num_kept} kept", flush=True)
        rollout.batch, rollout.meta = self.to_batch(rows, samples) if rows else (None, {})
        rollout.meta.update(rewards=rewards, refill=refill)

    # ----- phases -------------------------------------------------------------------------
    def _prompt_rows(self, step: int) -> list[dict]:
        episode, index = divmod(step, self.steps_per_episode)
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.config.seed + episode))
        chosen = order[index * self.config.rollout_batch_size:(index + 1) * self.config.rollout_batch_size]
        return [self.prompts[int(i)] for i in chosen]

    def evaluate(self, step: int) -> dict:
        """The eval prompts with the weights the engines hold now (synced after this rollout)."""
        started = time.perf_counter()
        k = self.evaluation.eval_n_samples_per_prompt
        sampling = replace(self.sampling, temperature=self.evaluation.eval_temperature, n_samples_per_prompt=k,
                           seed=self.config.seed + 7919)
        batch, meta = self.generate(list(self.eval_prompts), sampling)
        rewards = self._rewards(Experience.from_rollout(batch), meta, k)
        # --nonfinite_reward_policy skip: a non-finite reward counts as a failed answer here.
        metrics = eval_metrics(torch.nan_to_num(rewards, nan=0.0, posinf=0.0, neginf=0.0).tolist(),
                               batch.response_lengths.tolist(), k)
        if self.config.nonfinite_reward_policy == "skip":
            metrics["eval/nonfinite_rewards"] = int((~torch.isfinite(rewards)).sum())
        metrics["time/eval"] = time.perf_counter() - started
        return metrics

    def generate(self, rows: list[dict], sampling: SamplingConfig) -> tuple[RolloutBatch, dict]:
        """``rows`` generated now (evaluation; the rollouts go through ``_take_rollout``)."""
        return self.to_batch(rows, self.rollouts.generate([list(r["prompt_ids"]) for r in rows], sampling, rows=rows))

    def to_batch(self, rows: list[dict], samples: list) -> tuple[RolloutBatch, dict]:
        """The engines' samples of ``rows`` as a padded batch, and the texts the reward sources read."""
        prompt_ids = [list(rows[s.prompt_index]["prompt_ids"]) for s in samples]
        batch = build_rollout_batch(
            prompt_ids, [s.response_token_ids for s in samples], pad_id=self._pad_id(),
            response_log_probs=[s.logprobs or [0.0] * len(s.response_token_ids) for s in samples],
            response_loss_masks=rollout_loss_masks(samples, mask_truncated=self.config.mask_truncated_completions),
            routed_experts=([s.routed_experts for s in samples]
                            if any(s.routed_experts is not None for s in samples) else None),
        )
        meta = {
            "prompts": [rows[s.prompt_index]["prompt"] for s in samples],
            "responses": self.tokenizer.batch_decode([s.response_token_ids for s in samples], skip_special_tokens=True),
            "labels": [rows[s.prompt_index]["label"] for s in samples],
            "truncated": sum(s.truncated for s in samples),
        }
        if any(s.reward is not None for s in samples):  # multi-turn rollouts: the environment's rewards
            meta["environment_rewards"] = [s.reward for s in samples]
            meta["agent"] = agent_metrics(samples)
            if self.turn_rewards:
                meta["turn_rewards"] = per_turn_rewards([_earlier_turns(s, len(p)) for s, p in zip(samples, prompt_ids)],
                                                        batch.action_mask)
        return batch, meta

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def score(self, batch: RolloutBatch, meta: dict) -> tuple[Experience, torch.Tensor, dict]:
        """The rollout as an ``Experience`` with old / reference log-probs and values; its rewards."""
        micro, temperature = self.config.micro_rollout_batch_size, self.sampling.temperature
        layout = self._scoring_layout()
        experience = Experience.from_rollout(batch).with_fields(turn_rewards=meta.get("turn_rewards"))
        if self.config.token_budget.max_tokens is not None:
            check_fits(experience.lengths, self.config.token_budget.max_tokens, what="rollout sample")
        if self.config.router_replay and experience.routed_experts is None:
            raise ValueError("--router_replay: the rollout engines returned no routing for this rollout (the "
                             "--rollout_backend's engines must record the experts of each token)")
        rewards = meta.get("rewards")  # --dynamic_filtering scored them while it picked the groups
        old_log_probs = None
        metrics = {}
        if self.config.needs_old_log_probs(reference=self.reference is not None):
            if experience.routed_experts is not None:  # an MoE actor: routed as the engines did? (measured here)
                old_log_probs, mismatch = self.actor.log_probs_and_routing(experience, micro, temperature=temperature,
                                                                           **layout)
                if mismatch is not None:
                    metrics["rollout/routing_mismatch"] = mismatch
            else:
                old_log_probs = self.actor.log_probs(experience, micro, temperature=temperature, **layout)
        experience = experience.with_fields(
            old_log_probs=old_log_probs,
            ref_log_probs=(self.reference.log_probs(experience, micro, temperature=temperature, **layout)
                           if self.reference is not None else None),
            values=self.critic.values(experience, micro, **layout) if self.critic is not None else None,
        )
        if rewards is None:
            rewards = self._rewards(experience, meta, self.config.n_samples_per_prompt)
        metrics.update({
            "response_length": float(batch.response_lengths.float().mean()),
            "truncated_ratio": meta["truncated"] / batch.batch_size,
            **meta.get("agent", {}),
        })
        if self.config.overlong_buffer_len is not None:
            penalty = overlong_penalty(batch.response_lengths, max_len=self.sampling.max_new_tokens,
                                       buffer_len=self.config.overlong_buffer_len,
                                       factor=self.config.overlong_penalty_factor)
            rewards = rewards + penalty
            metrics.update({"overlong/penalty": float(penalty.mean()), "overlong/frac": float((penalty < 0).float().mean())})
        # The engines' log-probs go to the training forward, which measures the train-vs-engine
        # mismatch and makes --vllm_is_correction's weights (engine.rl.train_losses.rollout_mismatch).
        experience = experience.with_fields(rollout_log_probs=batch.rollout_log_probs)
        if self.config.nonfinite_reward_policy == "skip":
            experience, rewards, metrics["rollout/nonfinite_rewards"] = self._drop_nonfinite_groups(experience, rewards)
        metrics.update(meta.get("refill", {}))
        metrics["reward"] = float(rewards.mean()) if len(rewards) else float("nan")
        return experience, rewards, metrics

    def _scoring_layout(self) -> dict:
        """How the roles lay out their scoring micro-batches: --packing_samples, --max_tokens_per_gpu."""
        return {"packed": self.config.packing_samples, "max_tokens": self.config.token_budget.max_tokens}

    def _rewards(self, experience: Experience, meta: dict, n_samples_per_prompt: int) -> torch.Tensor:
        """Each sample's reward, the mean over the sources. A non-finite one is an error naming its source
        and sample (--nonfinite_reward_policy error), else NaN, for ``score`` to drop its group."""
        micro, layout = self.config.micro_rollout_batch_size, self._scoring_layout()
        per_source = [(f"reward model {group.config.engine.pretrain} (--reward_pretrain)",
                       group.rewards(experience, micro, **layout).tolist()) for group in self.reward_models]
        per_source += [(getattr(src, "name", type(src).__name__),
                        src.score(meta["prompts"], meta["responses"], meta["labels"])) for src in self.reward_sources]
        if "environment_rewards" in meta:
            per_source.append(("the environment (--agent_func_path / --agent_task)", meta["environment_rewards"]))
        if not per_source:
            raise ValueError("no reward source: pass --reward_pretrain and/or --remote_rm_url")
        found = nonfinite_rewards(per_source)
        if found and self.config.nonfinite_reward_policy == "error":
            raise nonfinite_reward_error(found, meta, n_samples_per_prompt)
        rewards = torch.tensor(combine_rewards([values for _, values in per_source]), dtype=torch.float32)
        rewards[list(found)] = float("nan")  # one mark for "dropped", whichever source and value
        return rewards

    def _drop_nonfinite_groups(self, experience: Experience, rewards: torch.Tensor
                               ) -> tuple[Experience, torch.Tensor, int]:
        """--nonfinite_reward_policy skip: every prompt group holding a non-finite reward leaves the
        rollout before anything reads its rewards (advantages, running moments, KL controller)."""
        bad = ~torch.isfinite(rewards)
        if not bad.any():
            return experience, rewards, 0
        n = self.config.n_samples_per_prompt
        rows = (~bad.view(-1, n).any(dim=1)).repeat_interleave(n).nonzero()[:, 0]
        print(f"warning: {int(bad.sum())} sample(s) with a non-finite reward (samples {bad.nonzero()[:, 0].tolist()[:8]}"
              f"): their {(rewards.numel() - rows.numel()) // n} prompt group(s) dropped from the rollout "
              "(--nonfinite_reward_policy skip)", flush=True)
        return experience.select(rows), rewards[rows], int(bad.sum())

    def advantages(self, experience: Experience, raw_rewards: torch.Tensor) -> tuple[Experience, dict]:
        config = self.config
        rewards = raw_rewards
        if config.normalize_reward_running:
            self.reward_moments.update(rewards)
            rewards = self.reward_moments.normalize(rewards)
        mask = experience.action_mask
        kl = None
        metrics = {}
        if experience.ref_log_probs is not None and experience.old_log_probs is not None:
            kl = kl_estimate(experience.old_log_probs, experience.ref_log_probs, estimator=config.kl_estimator,
                             action_mask=mask)
            metrics["kl"] = float((kl * mask).sum() / mask.sum().clamp(min=1))
        reward_kl_coef = 0.0 if config.use_kl_loss else self.kl_controller.value
        advantages, returns = compute_advantages(
            AdvantageInputs(rewards=rewards, action_mask=mask, kl=kl, kl_coef=reward_kl_coef, values=experience.values,
                            turn_rewards=experience.turn_rewards),
            config.advantage,
        )
        if metrics.get("kl") is not None:
            self.kl_controller.update(metrics["kl"], experience.batch_size)
        metrics["kl_coef"] = self.kl_controller.value
        experience = experience.with_fields(advantages=advantages, returns=returns)
        if experience.batch_size % config.train_batch_size:
            # Groups dropped (non-finite rewards, --dynamic_filtering short of groups) can leave a batch
            # that is no multiple of --train_batch_size: train on the largest multiple.
            experience = experience.select(slice(0, experience.batch_size // config.train_batch_size
                                                 * config.train_batch_size))
        metrics["advantage_abs_mean"] = float((advantages.abs() * mask).sum() / mask.sum().clamp(min=1))
        return experience, metrics

    def train_settings(self, step: int) -> TrainSettings:
        config = self.config
        low, high = config.clip_range
        return TrainSettings(
            train_batch_size=config.train_batch_size, micro_train_batch_size=config.micro_train_batch_size,
            max_epochs=config.max_epochs, seed=config.seed + step, eps_clip=low, eps_clip_high=high,
            dual_clip=config.dual_clip, value_clip=config.value_clip, temperature=self.sampling.temperature,
            kl_loss_coef=self.kl_controller.value if config.use_kl_loss else 0.0, kl_estimator=config.kl_estimator,
            ptx_coef=config.ptx_coef if self.ptx is not None else 0.0, pad_token_id=self._pad_id(),
            packing_samples=config.packing_samples, max_tokens_per_gpu=config.token_budget.max_tokens,
            vllm_is_cap=config.is_correction_band[1] if config.vllm_is_correction else None,
            vllm_is_low=config.is_correction_band[0], vllm_is_correction_type=config.vllm_is_correction_type,
            policy_loss_type=config.policy_loss_type, loss_agg_mode=config.aggregation_mode,
            max_response_len=self.sampling.max_new_tokens, entropy_coef=config.entropy_coef,
            cispo_eps_clip_low=config.cispo_eps_clip_low, cispo_eps_clip_high=config.cispo_eps_clip_high,
            # no old-log-prob forward: the training forward measures rollout/routing_mismatch
            measure_routing=not config.needs_old_log_probs(reference=self.reference is not None),
        )

    def train(self, experience: Experience, step: int) -> dict:
        settings = self.train_settings(step)
        metrics = {}
        if self.critic is not None:
            critic = self.critic.train(experience, "value", replace(settings, measure_routing=False))
            metrics.update({f"critic/{k}": v for k, v in critic.items()})
        if step >= self.config.freezing_actor_steps:
            ptx = self._ptx_rows(step, experience.batch_size)
            actor = self.actor.train(experience, "policy", settings, ptx)
            metrics.update({k if k in ROLLOUT_METRICS else f"actor/{k}": v for k, v in actor.items()})
            self.actor_version += 1
        return metrics

    def _ptx_rows(self, step: int, num_rows: int):
        """One pretraining sample per rollout sample of every optimizer step (OpenRLHF pairs one
        ptx micro-batch with each actor micro-batch), padded; None without --pretrain_data."""
        if self.ptx is None:
            return None
        per_step = self.config.train_batch_size
        num = self.config.max_epochs * (num_rows // per_step) * per_step
        return collate_ptx(self.ptx.samples(step, num), pad_id=self._pad_id())

    # ----- bookkeeping --------------------------------------------------------------------
    def _report(self, step: int, metrics: dict) -> None:
        shown = ("reward", "response_length", "kl", "actor/policy_loss", "actor/grad_norm", "actor/num_tokens",
                 "actor/approx_kl", "actor/ptx_loss", "actor/aux_loss", "actor/moe/load_cv", "advantage_abs_mean",
                 "actor/entropy_loss", "rollout_logprob_abs_diff", "vllm_is/mean", "vllm_is/masked_frac",
                 "overlong/penalty", "rollout/staleness", "rollout/resumed_samples", "rollout/groups_trained",
                 "rollout/gen_rounds", "rollout/routing_mismatch", "doctor/max_rel_diff", "doctor/first_jump_layer",
                 "doctor/first_routing_layer", "time/generate", "time/score", "time/train", "time/generate_wait",
                 "time/sync", "time/doctor", "eval/reward",
                 f"eval/pass@{self.evaluation.eval_n_samples_per_prompt}", "eval/response_length")
        line = " ".join(f"{k}={metrics[k]:.4g}" for k in shown if k in metrics)
        self.progress.write(f"rollout {step}/{self.num_steps} {line}")
        if self.record is not None:
            self.record.add({"step": step, **metrics})
        if self.logger is not None:
            self.logger.log(metrics, step)

    def _state(self, step: int) -> dict:
        return {"step": step, "kl_coef": self.kl_controller.value,
                "reward_moments": self.reward_moments.state(),
                "prompts": prompt_position(step=step, num_prompts=len(self.prompts),
                                           rollout_batch_size=self.config.rollout_batch_size,
                                           generation_batches=self._resume_generation_batch())}

    def _resume_generation_batch(self) -> int:
        """The first prompt batch the next rollout reads: a prefetched rollout's (--async_train; a resume
        generates it anew), else the next one of the stream."""
        return self._ahead[0].generation_batch if self._ahead else self.generation_batches

    def _role_checkpoint(self, role: str):
        return replace(self.checkpoint, ckpt_path=f"{self.checkpoint.ckpt_path}/{role}")

    def _maybe_checkpoint(self, step: int) -> None:
        ckpt = self.checkpoint
        if ckpt is None or not ckpt.ckpt_path or ckpt.save_steps <= 0:
            return
        if step % ckpt.save_steps and step != self.num_steps:
            return
        self._save_checkpoint(step, wait=step == self.num_steps)

    def _save_checkpoint(self, step: int, *, wait: bool) -> None:
        """``wait``: complete on return (--async_save writes the others in the background)."""
        state = self._state(step)
        self.actor.save_checkpoint(self._role_checkpoint("actor"), step, state, wait=wait)
        if self.critic is not None:
            self.critic.save_checkpoint(self._role_checkpoint("critic"), step, state, wait=wait)
        if self.save_hf_ckpt:
            self.actor.save_hf(f"{self._role_checkpoint('actor').ckpt_path}/global_step{step}_hf")
            if self.critic is not None and self.save_value_network:
                self.critic.save_hf(f"{self._role_checkpoint('critic').ckpt_path}/global_step{step}_hf")
        self._saved_step = step

    # ----- preemption ---------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        return self.preemption is not None and self.preemption.requested

    def _abandon_if_stopping(self, rollout: PrefetchedRollout) -> None:
        """Between the phases that change nothing (generate, score): a requested stop drops the rollout."""
        if self._stop_requested():
            raise RolloutAbandoned(rollout.generation_batch)

    def _stop(self, done: int) -> None:
        """After a signal, with ``done`` rollouts trained: their checkpoint (unless one holds them
        already), then the exception that ends the run."""
        path = f"{self.checkpoint.ckpt_path}/actor" if self.checkpoint is not None else None
        if done == self._saved_step:
            if done and self.checkpoint.async_save:  # that checkpoint may still be in the writer's hands
                for role in (self.actor, self.critic):
                    if role is not None:
                        role.finish_checkpoint()
            detail = (f"rollout {done} is checkpointed in {path}" if done else "no rollout trained yet: no checkpoint")
        elif self.save_on_preempt:
            self._save_checkpoint(done, wait=True)
            detail = f"checkpoint of rollout {done} written to {path}/global_step{done}"
        else:
            detail = (f"no checkpoint written ({done} rollouts trained; --save_on_preempt is off, or --ckpt_path "
                      "unused: pass --save_steps / --save_on_preempt)")
        raise self.preemption.stopped(f"{detail}; resume with --load_checkpoint")

    def _resume(self) -> int:
        ckpt = self.checkpoint
        if ckpt is None or not ckpt.load_checkpoint:
            return 0
        state = self.actor.resume(self._role_checkpoint("actor"))
        if state is None:
            from engine.runtime.checkpoint import no_checkpoint_message

            print(f"--load_checkpoint: {no_checkpoint_message(self._role_checkpoint('actor').ckpt_path)}: "
                  "starting from scratch", flush=True)
            return 0
        check_prompt_position(state.get("prompts"), num_prompts=len(self.prompts),
                              rollout_batch_size=self.config.rollout_batch_size)
        if self.critic is not None:
            self.critic.resume(self._role_checkpoint("critic"))
        self.generation_batches = resumed_generation_batches(state.get("prompts"), step=state["step"])
        self.kl_controller.value = state["kl_coef"]
        self.reward_moments.merge(*state["reward_moments"])
        self.rollouts.sync_weights()  # the engines still hold the initial weights
        if self.record is not None:
            self.record.resume_at(state["step"])  # the rollouts after the checkpoint run again
        print(f"resumed the RL run at rollout {state['step']}", flush=True)
        return state["step"]


def _earlier_turns(sample, prompt_length: int) -> list[tuple[int, float]]:
    """A trajectory's turns before its last (non-empty ones) as (label position of the turn's last
    token, the turn's reward): response token ``i`` is predicted at label position ``prompt_length - 1 + i``."""
    turns = [(stop, reward) for (start, stop), reward in zip(sample.segments or (), sample.turn_rewards or ())
             if stop > start]
    return [(prompt_length - 1 + stop - 1, reward) for stop, reward in turns[:-1]]
