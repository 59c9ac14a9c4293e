"""PPO / REINFORCE++ / RLOO / GRPO with Megatron roles and vLLM rollouts on Ray.

    python -m engine.cli.train_ppo_ray --pretrain HF_DIR --prompt_data prompts.jsonl --input_key prompt \\
        --remote_rm_url engine/tasks/arithmetic.py --label_key label \\
        --advantage_estimator grpo --n_samples_per_prompt 4 --rollout_batch_size 8 \\
        --actor_num_gpus_per_node 2 --actor_tensor_model_parallel_size 2 --vllm_num_engines 1

Runs under ``ray job submit`` too (it joins the running cluster when RAY_ADDRESS is set).
On CPU a "GPU" is one process: ``--actor_num_gpus_per_node 2`` starts two actor ranks.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import ClassVar

from engine.cli.openrlhf_compat import NO_SAVE_PATH
from engine.cli.options import OptionError, group, naming_flags, parse_job, print_notices, renaming_flags, run_cli
from engine.data.config import DataConfig
from engine.ray.config import ColocationConfig, EngineRestartConfig, VLLMEngineConfig, WeightSyncConfig
from engine.ray.rollout_backends import RolloutBackendConfig
from engine.rl.agents.config import AgentConfig
from engine.rl.config import GROUP_ESTIMATORS, DoctorConfig, PPOConfig, check_overlong_buffer
from engine.rl.console import ConsoleConfig
from engine.rl.evaluation import RLEvalConfig
from engine.rl.rollout import SamplingConfig
from engine.runtime.config import CheckpointConfig, LoggingConfig, OptimConfig, PreemptionConfig
from models.build_config import ModelBuildConfig
from models.lora.config import LoraConfig
from parallel.config import ParallelConfig
from parallel.options import option

PTX_TWINS = {"dataset": "pretrain_data", "dataset_probs": "pretrain_data_probs", "input_key": "pretrain_data_input_key",
             "output_key": "pretrain_data_output_key", "train_split": "pretrain_split"}


@dataclass(kw_only=True)
class RLModels:
    """Which models play which role."""

    pretrain: str = option(help="actor (and reference) model: HF directory or Megatron checkpoint")
    critic_pretrain: str | None = option(None, help="critic HF directory or Megatron checkpoint (default: the first "
                                                    "reward model, else the actor)")
    reward_pretrain: str | None = option(None, help="comma-separated reward models, HF directories or Megatron "
                                                    "checkpoints (rewards averaged)")
    remote_rm_url: str | None = option(None, help="comma-separated reward server URLs and/or reward_func .py files")
    critic_learning_rate: float = option(9e-6, help="the critic's peak learning rate (the actor's: --learning_rate)")
    save_path: str | None = option(None, help="final HF export of the actor")
    save_value_network: bool = option(False, help="also export the critic, to <save_path>_critic")
    save_hf_ckpt: bool = option(False, help="with each checkpoint also export the actor's HF weights, to "
                                            "<ckpt_path>/actor/global_step<N>_hf (the critic's too with "
                                            "--save_value_network)")
    enable_ema: bool = option(False, help="keep an exponential moving average of the actor's weights; --save_path "
                                          "exports it instead of the last weights (the rollouts use the actor)")
    ema_beta: float | None = option(None, help="EMA decay per actor optimizer step (--enable_ema; default 0.992)")
    seed: int = option(42, help="random seed (initialisation, prompt order, sampling)")

    def __post_init__(self) -> None:
        if self.ema_beta is not None and not self.enable_ema:
            raise ValueError("--ema_beta needs --enable_ema")
        if self.ema_beta is not None and not 0.0 <= self.ema_beta < 1.0:
            raise ValueError(f"--ema_beta must be in [0, 1), got {self.ema_beta}")

    @property
    def actor_ema_beta(self) -> float | None:
        """The actor's EMA decay, None without --enable_ema (OpenRLHF's default decay: 0.992)."""
        return (0.992 if self.ema_beta is None else self.ema_beta) if self.enable_ema else None

    @property
    def reward_paths(self) -> list[str]:
        return [p for p in (self.reward_pretrain or "").split(",") if p]


@dataclass(kw_only=True)
class RoleOptions:
    """How many ranks a role has and how they split its model."""

    num_nodes: int = option(1, help="nodes")
    num_gpus_per_node: int = option(1, help="ranks per node (on CPU: processes)")
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def num_ranks(self) -> int:
        return self.num_nodes * self.num_gpus_per_node


@dataclass(kw_only=True)
class PtxData:
    """Pretraining data mixed into the actor loss (PPO-ptx, weighted by --ptx_coef)."""

    pretrain_data: str | None = option(None, help="pretraining / SFT data (same sources as --prompt_data)")
    pretrain_data_probs: str | None = option(None, help="mixing probabilities of --pretrain_data")
    pretrain_split: str = option("train", help="split of --pretrain_data")
    pretrain_data_input_key: str | None = option(None, help="text column (default: --input_key)")
    pretrain_data_output_key: str | None = option(
        None, help="response column: loss on it only (prompt rendered like --prompt_data); default: loss on every "
                   "token of the input text")


def role_group(role: str):
    return group(prefix=f"{role}_", title=f"{role} role", factory=RoleOptions)


@dataclass(kw_only=True)
class PPOJob:
    models: RLModels = group(title="models")
    build: ModelBuildConfig = group(title="models", factory=ModelBuildConfig)
    actor: RoleOptions = role_group("actor")
    critic: RoleOptions = role_group("critic")
    ref: RoleOptions = role_group("ref")
    reward: RoleOptions = role_group("reward")
    placement: ColocationConfig = group(title="placement", factory=ColocationConfig)
    rollout: RolloutBackendConfig = group(title="vLLM rollouts", factory=RolloutBackendConfig)
    vllm: VLLMEngineConfig = group(title="vLLM rollouts", defaults={"gpu_memory_utilization": 0.95},
                                   factory=VLLMEngineConfig)
    sync: WeightSyncConfig = group(title="vLLM rollouts", factory=WeightSyncConfig)
    engine_restarts: EngineRestartConfig = group(title="vLLM rollouts", factory=EngineRestartConfig)
    # A repetition penalty would sample from another distribution than the policy the trainer scores.
    sampling: SamplingConfig = group(title="vLLM rollouts", exclude=("n_samples_per_prompt", "repetition_penalty"),
                                     factory=SamplingConfig)
    agent: AgentConfig = group(title="multi-turn agents", factory=AgentConfig)
    ppo: PPOConfig = group(title="algorithm", defaults={"advantage.reward_clip_range": (-10.0, 10.0)},
                           factory=PPOConfig)
    ptx: PtxData = group(title="ptx", factory=PtxData)
    eval: RLEvalConfig = group(title="evaluation", factory=RLEvalConfig)
    console: ConsoleConfig = group(title="console", factory=ConsoleConfig)
    doctor: DoctorConfig = group(title="mismatch doctor", factory=DoctorConfig)
    optim: OptimConfig = group(title="optimizer", defaults={"learning_rate": 1e-6},
                               aliases={"learning_rate": ("actor_learning_rate",)}, factory=OptimConfig)
    checkpoint: CheckpointConfig = group(title="checkpoints", defaults={"ckpt_path": "./ckpt/checkpoints_ppo_ray"},
                                         factory=CheckpointConfig)
    preemption: PreemptionConfig = group(title="checkpoints", factory=PreemptionConfig)
    logging: LoggingConfig = group(title="logging", factory=LoggingConfig)
    data: DataConfig = group(title="prompts", rename={"dataset": "prompt_data", "dataset_probs": "prompt_data_probs"},
                             aliases={"train_split": ("prompt_split",)},
                             exclude=("output_key", "chosen_key", "rejected_key", "prompt_key", "eval_split",
                                      "pretrain_mode", "packing_samples", "multiturn"))

    # One --seed, one --n_samples_per_prompt, one --pretrain for every config that needs them.
    derived: ClassVar[dict[str, str]] = {
        "ppo.seed": "models.seed", "data.seed": "models.seed", "vllm.seed": "models.seed",
        "vllm.pretrain": "models.pretrain", "sampling.n_samples_per_prompt": "ppo.n_samples_per_prompt",
        "ppo.advantage.n_samples_per_prompt": "ppo.n_samples_per_prompt",
    }


def parse_args(argv=None) -> PPOJob:
    job = parse_job(PPOJob, argv, description=__doc__)
    if job.ppo.vllm_is_correction and job.sampling.temperature != 1.0:
        # vLLM 0.32 returns the sampled tokens' log-probs before temperature: the weights would
        # measure the temperature, not the engines' mismatch.
        raise OptionError(f"--vllm_is_correction with --temperature {job.sampling.temperature}: the engines' "
                          "log-probs are of the untempered policy; use --temperature 1")
    if job.doctor.doctor_every and not job.vllm.enforce_eager:
        # vLLM compiles the forward of engines that are not eager, and a compiled forward runs no module hooks.
        raise OptionError("--doctor_every needs --enforce_eager: the doctor reads each layer of the engine's model "
                          "through forward hooks, which a compiled (torch.compile / CUDA graph) forward skips")
    if job.ppo.async_train:
        _check_async(job)
    if job.agent.turn_rewards == "per_turn":
        _check_turn_rewards(job)
    if job.ppo.token_budget.use_dynamic_batch_size and job.ptx.pretrain_data:
        raise OptionError("--use_dynamic_batch_size with --pretrain_data is not supported: the ptx rows ride in the "
                          "rollout's fixed micro-batches; drop one of the two")
    _check_loss_defaults(job)
    if not job.models.save_path:
        print_notices([NO_SAVE_PATH])
    return job


def _check_turn_rewards(job: PPOJob) -> None:
    """--turn_rewards per_turn places the environment's rewards on the turns' tokens as they are."""
    estimator = job.ppo.advantage.estimator
    if estimator in GROUP_ESTIMATORS:
        raise OptionError(f"--turn_rewards per_turn with --advantage_estimator {estimator}: its baseline compares "
                          "whole trajectories, so it takes their summed reward (--turn_rewards sum); per-turn "
                          "rewards need --advantage_estimator gae or reinforce")
    others = [flag for flag, on in (("--reward_pretrain", job.models.reward_pretrain),
                                    ("--remote_rm_url", job.models.remote_rm_url),
                                    ("--normalize_reward_running", job.ppo.normalize_reward_running)) if on]
    if others:
        raise OptionError(f"--turn_rewards per_turn with {others[0]}: the turns' rewards are placed as the environment "
                          "gave them, so they must be the whole reward, unscaled; drop one of the two")


def _check_loss_defaults(job: PPOJob) -> None:
    """The overlong buffer against --generate_max_len; the dr_grpo default aggregation, said."""
    ppo = job.ppo
    if ppo.overlong_buffer_len is not None:
        try:
            check_overlong_buffer(ppo.overlong_buffer_len, job.sampling.max_new_tokens)
        except ValueError as exc:
            raise OptionError(str(exc)) from None
    if ppo.loss_agg_mode is None and ppo.aggregation_mode != "token-mean":
        print_notices([f"--advantage_estimator {ppo.advantage.estimator}: --loss_agg_mode {ppo.aggregation_mode} "
                       "(Dr. GRPO's: token sums over --generate_max_len; pass --loss_agg_mode to choose another)"])


def _check_async(job: PPOJob) -> None:
    """--async_train overlaps generation with training: not where they take turns on the same GPUs."""
    shared = [flag for flag, on in (("--colocate_all_models", job.placement.colocate_all_models),
                                    ("--vllm_enable_sleep", job.vllm.enable_sleep_mode),
                                    ("--megatron_enable_sleep", job.placement.megatron_enable_sleep))
              if on]
    if shared:
        raise OptionError(f"--async_train with {shared[0]}: the engines and the trainers take turns on the same "
                          "devices there, so generation cannot overlap training; drop one of the two")


# ----- checks before anything starts ----------------------------------------------------------
def pretrain_data_config(job: PPOJob) -> DataConfig | None:
    """The DataConfig of --pretrain_data (None without it): raw text with a loss on every
    token (OpenRLHF's pretrain mode), or prompt / response pairs with --pretrain_data_output_key."""
    ptx, data = job.ptx, job.data
    if not ptx.pretrain_data:
        return None
    pairs = ptx.pretrain_data_output_key is not None
    # DataConfig's messages name the --dataset flags; here the user passed their --pretrain_* twins.
    with renaming_flags(PTX_TWINS, context="--pretrain_data: "):
        return DataConfig(
            dataset=ptx.pretrain_data, dataset_probs=ptx.pretrain_data_probs,
            input_key=ptx.pretrain_data_input_key or data.input_key, output_key=ptx.pretrain_data_output_key,
            input_template=data.input_template if pairs else None,
            apply_chat_template=data.apply_chat_template and pairs,
            tokenizer_chat_template=data.tokenizer_chat_template if pairs and data.apply_chat_template else None,
            max_len=data.max_len, train_split=ptx.pretrain_split, pretrain_mode=not pairs,
            skip_bad_rows=data.skip_bad_rows, seed=job.models.seed,
        )


def _flag_group(key: str) -> str:
    """The job field whose flags configure role ``key`` (reward0, reward1 ... share --reward_*)."""
    return "reward" if key.startswith("reward") else key


def _ranks(configs: dict) -> dict[str, int]:
    return {key: config.num_ranks for key, config in configs.items()}


def _engine_workers(job: PPOJob) -> int:
    return job.vllm.num_engines * job.vllm.tensor_parallel_size


def check_job(job: PPOJob) -> None:
    """Every check that needs no cluster: colocation, each role's grid against its ranks and its
    model (errors name the role's own flags), the ptx data flags."""
    from engine.ray.colocation import colocated_sets
    from models.sources import ModelSource

    if job.build.lora.enabled and job.models.enable_ema:
        raise OptionError("--enable_ema with --lora_rank is not supported: the average would be of the adapters "
                          "over a frozen base (train without LoRA, or without --enable_ema)")
    configs = role_configs(job, total_steps=1)
    colocated_sets(job.placement, _ranks(configs), engine_workers=_engine_workers(job))
    pretrain_data_config(job)
    make_environment(job)  # an agent file that does not load is a flag error
    for key, config in configs.items():
        with naming_flags(PPOJob, _flag_group(key)):
            source = ModelSource.open(config.engine.pretrain, flag=config.engine.pretrain_flag)
            source.check_role(value_head=config.engine.build.value_head, trainable=config.trainable)
            adapter = source.adapter()
            config.engine.parallel.validate_model(
                num_layers=adapter.num_layers, num_attention_heads=adapter.attention.num_heads,
                num_query_groups=adapter.attention.num_kv_heads, num_experts=adapter.num_experts)
            if config.router_replay:
                check_router_replay(job, num_experts=adapter.num_experts)


def check_router_replay(job: PPOJob, *, num_experts: int) -> None:
    """--router_replay needs an MoE actor. Activation recompute is fine: a recomputed router replays its
    own micro-batch's routing (models.router_replay)."""
    if not num_experts:
        raise OptionError(f"--router_replay: --pretrain {job.models.pretrain} is a dense model; routing replay "
                          "applies to mixture-of-experts actors")


# ----- the roles ------------------------------------------------------------------------------
def role_configs(job: PPOJob, *, total_steps: int) -> dict:
    """The RoleConfig of every role this run starts: actor, ref, reward0 ..., critic."""
    from engine.ray.role_worker import RoleConfig
    from engine.runtime.engine import EngineConfig

    offload = job.placement.ref_reward_offload

    def config(key: str, pretrain: str, flag: str, *, trainable: bool, value_head: bool, learning_rate=None,
               ema_beta=None):
        optim = replace(job.optim, learning_rate=learning_rate) if learning_rate is not None else job.optim
        # LoRA adapts the trained roles (actor, critic); the frozen ones are plain.
        build = replace(job.build, value_head=value_head, lora=job.build.lora if trainable else LoraConfig(),
                        value_normalisation=_value_normalisation(job, key, pretrain, flag) if value_head else None)
        options: RoleOptions = getattr(job, _flag_group(key))
        with naming_flags(PPOJob, _flag_group(key)):
            return RoleConfig(
                name=key, num_ranks=options.num_ranks, trainable=trainable, offload=offload and not trainable,
                ema_beta=ema_beta, router_replay=job.ppo.router_replay and key == "actor",
                total_steps=total_steps if trainable else 1,
                engine=EngineConfig(pretrain=pretrain, pretrain_flag=flag, seed=job.models.seed,
                                    parallel=options.parallel, optim=optim,
                                    build=build))

    models, reward_paths = job.models, job.models.reward_paths
    out = {"actor": config("actor", models.pretrain, "--pretrain", trainable=True, value_head=False,
                           ema_beta=models.actor_ema_beta)}
    if job.ppo.needs_reference:
        out["ref"] = config("ref", models.pretrain, "--pretrain", trainable=False, value_head=False)
    for i, path in enumerate(reward_paths):
        out[f"reward{i}"] = config(f"reward{i}", path, "--reward_pretrain", trainable=False, value_head=True)
    if job.ppo.needs_critic:
        critic_path, flag = ((models.critic_pretrain, "--critic_pretrain") if models.critic_pretrain else
                             (reward_paths[0], "--reward_pretrain") if reward_paths else (models.pretrain, "--pretrain"))
        out["critic"] = config("critic", critic_path, flag, trainable=True, value_head=True,
                               learning_rate=models.critic_learning_rate)
    return out


def _value_normalisation(job: PPOJob, key: str, path: str, flag: str) -> tuple[float, float] | None:
    """``--normalize_reward``: a reward model's outputs by the mean / std its config.json holds (an
    error when it has none); the critic's by its own checkpoint's, when it has them (a critic
    started from the reward model), else unnormalised (it learns the normalised returns' scale)."""
    if not job.ppo.normalize_reward:
        return None
    from models.sources import ModelSource

    statistics = ModelSource.open(path, flag=flag).reward_statistics
    if statistics is None and key != "critic":
        raise ValueError(f"--normalize_reward: {flag} {path}: its config.json has no 'mean' / 'std' field; it is "
                         "written by train_rm (or drop the flag)")
    if statistics is not None and not (math.isfinite(statistics[0]) and statistics[1] > 0):
        raise ValueError(f"--normalize_reward: {flag} {path}: config.json has mean={statistics[0]}, "
                         f"std={statistics[1]}; std must be > 0")
    return statistics


def _link_logs(run_dir) -> None:
    """``<run_dir>/ray_logs``: the Ray session's log files on this machine (engines, role workers)."""
    from pathlib import Path

    from engine.ray.cluster import session_log_dir

    logs, link = session_log_dir(), Path(run_dir) / "ray_logs"
    if logs and Path(logs).is_dir() and link.parent.is_dir() and not link.exists():
        link.symlink_to(logs, target_is_directory=True)


def _optimizer_steps(job: PPOJob, num_prompts: int) -> int:
    ppo = job.ppo
    rollouts = min(num_prompts // ppo.rollout_batch_size * ppo.num_episodes, ppo.max_steps or 1 << 62)
    return max(rollouts * ppo.max_epochs * ppo.rollout_batch_size * ppo.n_samples_per_prompt
               // ppo.train_batch_size, 1)


def _max_positions(source) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.hf_dir).max_position_embeddings


def load_pretrain_data(job: PPOJob, tokenizer):
    config = pretrain_data_config(job)
    if config is None or job.ppo.ptx_coef == 0:
        return None
    from engine.data.sft import SFTDataset

    dataset = SFTDataset.from_config(config, tokenizer)
    if len(dataset) == 0:
        raise ValueError(f"--pretrain_data {job.ptx.pretrain_data} has no usable samples")
    return dataset


def build_and_fit(job: PPOJob, *, sampling_overrides: dict | None = None) -> list[dict]:
    """Start the cluster pieces, run the loop, shut everything down (also on errors).

    ``sampling_overrides``: SamplingConfig fields no flag sets (benchmarks force full-length
    rollouts with ``min_new_tokens``, or shape the lengths with ``stop_token_ids``: those replace EOS)."""
    from engine.data.prompts import PromptDataset
    from engine.ray.cluster import join_cluster
    from engine.ray.rollout_backends import rollout_backend
    from engine.rl.console import RunRecord
    from models.sources import ModelSource
    from parallel.preemption import PreemptionWatch

    source = ModelSource.open(job.models.pretrain)
    tokenizer = source.tokenizer()
    prompts = PromptDataset.from_config(job.data, tokenizer)
    eval_prompts = (PromptDataset.from_config(replace(job.data, dataset=job.eval.eval_dataset, dataset_probs=None),
                                              tokenizer) if job.eval.eval_dataset else None)
    pretrain_samples = load_pretrain_data(job, tokenizer)
    # Every module the driver runs is imported before joining: under `ray job submit`, ray.init
    # unpacks the job's working directory anew, and a module first imported after it is not found.
    backend = rollout_backend(job.rollout.rollout_backend)
    join_cluster(log_to_driver=job.console.verbose)
    # After joining (ray.init sets a SIGTERM handler of its own): from here a signal stops the run
    # at its next safe point, with a checkpoint, and everything started below is shut down.
    saves = job.preemption.saves(job.checkpoint)
    watch = PreemptionWatch(grace_s=job.preemption.preempt_grace_s,
                            what="stopping after the current phase" + (", then a checkpoint" if saves else ""))
    # After joining: a submitted job's working directory is unpacked anew by ray.init.
    record = RunRecord(job.console.resolved_run_dir())
    watch.install()
    started = _Started()
    try:
        configs = role_configs(job, total_steps=_optimizer_steps(job, len(prompts)))
        engine_config, rollouts = _start(job, source, backend, configs, started)
        if job.agent.enabled:
            rollouts = agent_rollouts(job, rollouts, tokenizer)
        trainer = _trainer(job, started.groups, rollouts, prompts=prompts, eval_prompts=eval_prompts,
                           tokenizer=tokenizer, pretrain_samples=pretrain_samples, record=record, watch=watch,
                           saves=saves, max_tokens=engine_config.max_model_len - 1,
                           sampling_overrides=sampling_overrides)
        return trainer.fit()
    finally:
        _link_logs(record.run_dir)
        print(f"run directory: {record.run_dir} (metrics.jsonl, reward.png, rollout.png, ray_logs/)", flush=True)
        started.shutdown()
        watch.uninstall()


@dataclass
class _Started:
    """What ``build_and_fit`` started, shut down on the way out (also after a start that failed half-way)."""

    groups: dict = field(default_factory=dict)  # role key -> RoleGroup
    pool: object = None  # the engine pool
    placements: dict = field(default_factory=dict)

    def shutdown(self) -> None:
        from engine.ray.colocation import release_placements

        if self.pool is not None:
            self.pool.shutdown()
        for group_ in self.groups.values():
            group_.shutdown()
        release_placements(self.placements)


def _start(job: PPOJob, source, backend, configs: dict, started: _Started):
    """Place and start the roles and the engines into ``started`` (the roles side by side, and beside
    the engines unless those must start first); the engines' config and their ``EngineRollouts``."""
    from engine.ray.colocation import NodeDealer, describe_placement, make_placements
    from engine.ray.role_group import RoleGroup
    from engine.ray.rollouts import EngineRollouts, TrainerSleep
    from engine.ray.weight_sync import ActorWeightSync, resolve_sync_backend

    placements = started.placements = make_placements(job.placement, _ranks(configs),
                                                      engine_workers=_engine_workers(job))
    dealer = NodeDealer.of_cluster()
    engine_config = _engine_config(job, source, placements.get("vllm"))
    colocated_engines = engines_first(placements)
    # Before anything starts: a transport that cannot reach these engines is a flag error.
    transport = resolve_sync_backend(job.sync.backend, cuda=backend.on_gpus(engine_config),
                                     colocated=colocated_engines)
    if colocated_engines:
        started.pool = _start_engines(backend, engine_config, dealer, sleep=job.vllm.enable_sleep_mode)
    for key, config in configs.items():
        started.groups[key] = RoleGroup(config, dealer.pin(placements[key], config.num_ranks), wait=False)
    if started.pool is None:
        started.pool = _start_engines(backend, engine_config, dealer, sleep=False)
    groups = started.groups
    for group_ in groups.values():
        group_.wait_ready()
    print(describe_placement(groups, started.pool), f"weight sync: {transport}", sep="\n", flush=True)
    trainers = (TrainerSleep(groups["actor"], groups.get("critic"))
                if job.placement.trainers_sleep(engines_share_gpus=colocated_engines) else None)
    rollouts = EngineRollouts(started.pool, ActorWeightSync(groups["actor"], started.pool, job.sync, backend=transport),
                              sleep=job.vllm.enable_sleep_mode, synced=backend.loads_own_weights(engine_config),
                              asleep=colocated_engines and job.vllm.enable_sleep_mode, trainers=trainers,
                              restarts=job.engine_restarts)
    return engine_config, rollouts


def _trainer(job: PPOJob, groups: dict, rollouts, *, prompts, eval_prompts, tokenizer, pretrain_samples, record,
             watch, saves: bool, max_tokens: int, sampling_overrides: dict | None):
    """The loop over the started roles and engines (``max_tokens``: the longest sequence the doctor probes)."""
    from engine.ray.doctor import RayDoctor
    from engine.rl.ppo_trainer import PPOTrainer
    from engine.rl.rewards import make_reward_sources
    from engine.runtime.logging import MetricsLogger

    stop_ids = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
    return PPOTrainer(
        job.ppo, prompts=prompts, tokenizer=tokenizer, rollouts=rollouts, actor=groups["actor"],
        sampling=replace(job.sampling, **({"stop_token_ids": stop_ids} | (sampling_overrides or {}))),
        critic=groups.get("critic"), reference=groups.get("ref"),
        reward_models=[group_ for key, group_ in groups.items() if key.startswith("reward")],
        reward_sources=make_reward_sources(job.models.remote_rm_url),
        logger=MetricsLogger(job.logging), checkpoint=job.checkpoint, save_path=job.models.save_path,
        save_value_network=job.models.save_value_network, save_hf_ckpt=job.models.save_hf_ckpt,
        pretrain_samples=pretrain_samples,
        evaluation=job.eval, eval_prompts=eval_prompts, record=record, preemption=watch, save_on_preempt=saves,
        turn_rewards=job.agent.turn_rewards == "per_turn",
        doctor=(RayDoctor(job.doctor, actor=groups["actor"], engines=rollouts, run_dir=record.run_dir,
                          max_tokens=max_tokens) if job.doctor.doctor_every else None),
    )


def make_environment(job: PPOJob):
    """The factory of one trajectory's environment (--agent_func_path / --agent_task); None without."""
    if job.agent.agent_func_path:
        from engine.rl.agents.openrlhf import environment_factory

        return environment_factory(job.agent.agent_func_path)
    if job.agent.agent_task:
        from engine.tasks.environment import environment_factory

        return environment_factory(job.agent.agent_task)
    return None


def trajectory_len(job: PPOJob) -> int:
    """Tokens per multi-turn trajectory (--max_len, the ptx samples' cut too: tokens per sample)."""
    return job.data.max_len


def agent_rollouts(job: PPOJob, rollouts, tokenizer):
    """``rollouts`` driven by the multi-turn agent executor."""
    from engine.rl.agents.executor import AgentExecutor
    from engine.rl.agents.rollouts import AgentRollouts

    executor = AgentExecutor(make_environment=make_environment(job), tokenizer=tokenizer, max_turns=job.agent.turns,
                             max_len=trajectory_len(job), step_timeout_s=job.agent.step_timeout_s,
                             fail_fast=job.agent.agent_fail_fast)
    return AgentRollouts(rollouts, executor)


def engines_first(placements: dict) -> bool:
    """Under --colocate_all_models on GPU (the engines share the roles' placement group) the engines
    start before the roles: vLLM sizes its KV cache from the GPU memory free at start-up and
    refuses to start on a GPU that the Megatron ranks already fill (OpenRLHF orders it the same)."""
    return placements.get("vllm") is not None


def _engine_config(job, source, shared):
    """The engines' config; ``weights_from_trainer``: the actor's weights reach the engines before
    the first rollout, so a Megatron --pretrain starts them without weights of their own."""
    return replace(
        job.vllm, max_model_len=min(max(job.data.prompt_max_len + job.sampling.max_new_tokens,
                                        trajectory_len(job) if job.agent.enabled else 0), _max_positions(source)),
        shared_placement_group=shared.placement_group if shared else None,
        shared_bundle_order=shared.bundle_order if shared else (),
        gpu_fraction=shared.gpu_per_rank if shared else 1.0, weights_from_trainer=True,
        # An MoE actor: the engines return each token's experts (--router_replay, rollout/routing_mismatch).
        return_routed_experts=bool(source.adapter().num_experts))


def _start_engines(backend, engine_config, dealer, *, sleep: bool):
    """Start the ``--rollout_backend`` engine pool (on the dealt nodes of a CPU-only cluster);
    ``sleep``: release their GPU memory at once, for the roles created next."""
    if engine_config.shared_placement_group is None:
        engine_config = replace(engine_config, node_ids=dealer.deal(engine_config.num_engines))
    pool = backend.start(engine_config)
    if sleep:
        pool.sleep()
    return pool


def job_paths(job: PPOJob) -> dict[str, str | None]:
    """The output paths this run writes, by flag: the driver locks each for the run's life."""
    save = job.models.save_path
    return {"--ckpt_path": job.preemption.used_path(job.checkpoint), "--save_path": save,
            "--save_value_network": f"{save}_critic" if save and job.models.save_value_network else None}


def main(argv=None) -> list[dict]:
    job = parse_args(argv)  # first: --help imports nothing heavy
    from engine.ray.cluster import check_address

    check_job(job)  # flag errors before anything starts
    check_address(os.environ.get("RAY_ADDRESS"))  # before megatron-core is imported: a wrong address fails in seconds
    from engine.runtime.checkpoint import check_resumable
    from engine.runtime.path_lock import holding_paths

    try:
        check_resumable(job.checkpoint, subdirectory="actor")
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    with holding_paths(job_paths(job)):  # before anything is written
        return build_and_fit(job)


if __name__ == "__main__":
    run_cli(main)
