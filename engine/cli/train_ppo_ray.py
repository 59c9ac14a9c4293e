"""PPO / REINFORCE++ / RLOO / GRPO with Megatron roles and vLLM rollouts on Ray.

    python -m engine.cli.train_ppo_ray --pretrain HF_DIR --prompt_data prompts.jsonl --input_key prompt \\
        --remote_rm_url engine/tasks/arithmetic.py --label_key label \\
        --advantage_estimator grpo --n_samples_per_prompt 4 --rollout_batch_size 8 \\
        --actor_num_gpus_per_node 2 --actor_tensor_model_parallel_size 2 --vllm_num_engines 1

Runs under ``ray job submit`` too (it joins the running cluster when RAY_ADDRESS is set).
On CPU a "GPU" is one process: ``--actor_num_gpus_per_node 2`` starts two actor ranks.
"""
from __future__ import annotations

import argparse
import os

import torch

from engine.cli.args import add_optim_args
from engine.cli.data_args import add_data_args, data_config


def _add_role_args(parser, role: str, *, default_ranks: int = 1) -> None:
    g = parser.add_argument_group(f"{role} role")
    g.add_argument(f"--{role}_num_nodes", type=int, default=1)
    g.add_argument(f"--{role}_num_gpus_per_node", type=int, default=default_ranks,
                   help="ranks per node (on CPU: processes)")
    g.add_argument(f"--{role}_tensor_model_parallel_size", type=int, default=1)
    g.add_argument(f"--{role}_pipeline_model_parallel_size", type=int, default=1)
    g.add_argument(f"--{role}_context_parallel_size", type=int, default=1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("models")
    g.add_argument("--pretrain", required=True, help="actor (and reference) HF directory")
    g.add_argument("--critic_pretrain", default=None, help="critic HF directory (default: reward model or actor)")
    g.add_argument("--reward_pretrain", default=None, help="comma-separated reward model HF directories")
    g.add_argument("--remote_rm_url", default=None, help="comma-separated reward server URLs and/or reward_func .py files")
    g.add_argument("--save_path", default=None)
    g.add_argument("--save_value_network", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--seed", type=int, default=42)
    for role in ("actor", "critic", "ref", "reward"):
        _add_role_args(parser, role)
    g = parser.add_argument_group("placement")
    g.add_argument("--colocate_actor_ref", action="store_true", help="actor and reference share devices")
    g.add_argument("--colocate_critic_reward", action="store_true", help="critic and reward models share devices")
    g.add_argument("--colocate_all_models", action="store_true",
                   help="every role and (on GPU) the vLLM engines share the actor's devices")
    g.add_argument("--ref_reward_offload", action="store_true",
                   help="reference / reward model weights stay in host memory except during their forward")
    g = parser.add_argument_group("vLLM rollouts")
    g.add_argument("--vllm_num_engines", type=int, default=1)
    g.add_argument("--vllm_tensor_parallel_size", type=int, default=1)
    g.add_argument("--vllm_gpu_memory_utilization", type=float, default=0.9)
    g.add_argument("--enforce_eager", action="store_true")
    g.add_argument("--enable_prefix_caching", action="store_true")
    g.add_argument("--vllm_enable_sleep", action="store_true",
                   help="engines release GPU memory while the roles train (vLLM sleep mode, CUDA)")
    g.add_argument("--vllm_sync_backend", default="gloo", choices=["gloo", "nccl", "cuda_ipc"])
    g.add_argument("--vllm_sync_bucket_mb", type=int, default=64)
    g.add_argument("--vllm_dtype", default="auto")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--generate_max_len", type=int, default=1024)
    g = parser.add_argument_group("algorithm")
    g.add_argument("--advantage_estimator", default="gae", help="gae | reinforce | reinforce_baseline | rloo | grpo")
    g.add_argument("--n_samples_per_prompt", type=int, default=1)
    g.add_argument("--rollout_batch_size", type=int, default=8)
    g.add_argument("--micro_rollout_batch_size", type=int, default=8)
    g.add_argument("--train_batch_size", type=int, default=8)
    g.add_argument("--micro_train_batch_size", type=int, default=4)
    g.add_argument("--max_epochs", type=int, default=1)
    g.add_argument("--num_episodes", type=int, default=1)
    g.add_argument("--max_steps", type=int, default=None, help="rollouts to run")
    g.add_argument("--eps_clip", type=float, default=0.2)
    g.add_argument("--value_clip", type=float, default=0.2)
    g.add_argument("--gamma", type=float, default=1.0)
    g.add_argument("--lambd", type=float, default=1.0)
    g.add_argument("--init_kl_coef", type=float, default=0.01)
    g.add_argument("--kl_target", type=float, default=None)
    g.add_argument("--kl_horizon", type=int, default=10000)
    g.add_argument("--use_kl_loss", action="store_true")
    g.add_argument("--kl_estimator", default="k1", choices=["k1", "k2", "k3"])
    g.add_argument("--use_kl_estimator_k3", action="store_true", help="alias of --kl_estimator k3")
    g.add_argument("--normalize_reward", action="store_true")
    g.add_argument("--reward_clip_range", type=float, nargs=2, default=None)
    g.add_argument("--no_advantage_std_norm", action="store_true")
    g.add_argument("--dynamic_filtering", action="store_true")
    g.add_argument("--freezing_actor_steps", type=int, default=0)
    g.add_argument("--critic_learning_rate", type=float, default=9e-6)
    g = parser.add_argument_group("ptx (pretraining loss in the actor)")
    g.add_argument("--pretrain_data", default=None,
                   help="pretraining / SFT data (same sources as --prompt_data); adds --ptx_coef x NLL to the actor loss")
    g.add_argument("--pretrain_data_probs", default=None, help="mixing probabilities of --pretrain_data")
    g.add_argument("--pretrain_split", default="train")
    g.add_argument("--pretrain_data_input_key", default=None, help="text column (default: --input_key)")
    g.add_argument("--pretrain_data_output_key", default=None,
                   help="response column: loss on it only (prompt rendered like --prompt_data); "
                        "default: loss on every token of the input text")
    g.add_argument("--ptx_coef", type=float, default=0.05)
    add_optim_args(parser, learning_rate=1e-6)
    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument("--ckpt_path", default=None)
    g.add_argument("--save_steps", type=int, default=-1)
    g.add_argument("--max_ckpt_num", type=int, default=3)
    g.add_argument("--load_checkpoint", action="store_true")
    g.add_argument("--logging_steps", type=int, default=1)
    g.add_argument("--use_tensorboard", default=None)
    g.add_argument("--use_wandb", default=None)
    g.add_argument("--wandb_project", default="megatron-rlhf")
    g.add_argument("--wandb_run_name", default=None)
    add_data_args(parser, prompt_data=True)
    args = parser.parse_args(argv)
    if args.use_kl_estimator_k3:
        args.kl_estimator = "k3"
    return args


def ppo_config(args):
    from engine.rl.advantages import AdvantageConfig
    from engine.rl.ppo_trainer import PPOConfig

    return PPOConfig(
        advantage=AdvantageConfig(
            estimator=args.advantage_estimator, gamma=args.gamma, lambd=args.lambd,
            n_samples_per_prompt=args.n_samples_per_prompt,
            reward_clip_range=tuple(args.reward_clip_range) if args.reward_clip_range else None,
            advantage_std_norm=not args.no_advantage_std_norm,
        ),
        rollout_batch_size=args.rollout_batch_size, n_samples_per_prompt=args.n_samples_per_prompt,
        train_batch_size=args.train_batch_size, micro_train_batch_size=args.micro_train_batch_size,
        micro_rollout_batch_size=args.micro_rollout_batch_size, max_epochs=args.max_epochs,
        num_episodes=args.num_episodes, max_steps=args.max_steps, eps_clip=args.eps_clip,
        value_clip=args.value_clip, init_kl_coef=args.init_kl_coef, kl_target=args.kl_target,
        kl_horizon=args.kl_horizon, use_kl_loss=args.use_kl_loss, kl_estimator=args.kl_estimator,
        normalize_reward=args.normalize_reward, dynamic_filtering=args.dynamic_filtering,
        freezing_actor_steps=args.freezing_actor_steps, ptx_coef=args.ptx_coef, temperature=args.temperature,
        seed=args.seed,
    )


def pretrain_data_config(args):
    """The DataConfig of --pretrain_data (None without it): raw text with a loss on every
    token (OpenRLHF's pretrain mode), or prompt / response pairs with --pretrain_data_output_key."""
    if not args.pretrain_data:
        return None
    from engine.data.config import DataConfig

    pairs = args.pretrain_data_output_key is not None
    try:
        return DataConfig(
            dataset=args.pretrain_data, dataset_probs=args.pretrain_data_probs,
            input_key=args.pretrain_data_input_key or args.input_key, output_key=args.pretrain_data_output_key,
            input_template=args.input_template if pairs else None,
            apply_chat_template=args.apply_chat_template and pairs,
            tokenizer_chat_template=args.tokenizer_chat_template if pairs and args.apply_chat_template else None,
            max_len=args.max_len, train_split=args.pretrain_split, pretrain_mode=not pairs,
            skip_bad_rows=args.skip_bad_rows, seed=args.seed,
        )
    except ValueError as exc:
        raise ValueError(f"--pretrain_data: {_pretrain_flag_names(str(exc))}") from None


# DataConfig's messages name the --dataset flags; here the user passed their --pretrain_* twins.
_PRETRAIN_FLAGS = {"dataset_probs": "pretrain_data_probs", "dataset": "pretrain_data",
                   "input_key": "pretrain_data_input_key", "output_key": "pretrain_data_output_key",
                   "train_split": "pretrain_split"}


def _pretrain_flag_names(message: str) -> str:
    import re

    return re.sub(r"--(dataset_probs|dataset|input_key|output_key|train_split)\b",
                  lambda m: f"--{_PRETRAIN_FLAGS[m.group(1)]}", message)


def load_pretrain_data(args, tokenizer):
    config = pretrain_data_config(args)
    if config is None or args.ptx_coef == 0:
        return None
    from engine.data.sft import SFTDataset

    dataset = SFTDataset.from_config(config, tokenizer)
    if len(dataset) == 0:
        raise ValueError(f"--pretrain_data {args.pretrain_data} has no usable samples")
    return dataset


def colocation_config(args):
    from engine.ray.colocation import ColocationConfig

    return ColocationConfig(colocate_actor_ref=args.colocate_actor_ref, colocate_critic_reward=args.colocate_critic_reward,
                            colocate_all_models=args.colocate_all_models)


def role_ranks(args, config) -> dict[str, int]:
    """Ranks of every role this run starts (keys as build_and_fit names the groups)."""
    def ranks(role):
        return getattr(args, f"{role}_num_nodes") * getattr(args, f"{role}_num_gpus_per_node")

    out = {"actor": ranks("actor")}
    if config.needs_reference:
        out["ref"] = ranks("ref")
    out.update({f"reward{i}": ranks("reward") for i, p in enumerate((args.reward_pretrain or "").split(",")) if p})
    if config.needs_critic:
        out["critic"] = ranks("critic")
    return out


def check_colocation(args, config) -> None:
    from engine.ray.colocation import colocated_sets

    colocated_sets(colocation_config(args), role_ranks(args, config),
                   engine_workers=args.vllm_num_engines * args.vllm_tensor_parallel_size)


def role_config(args, role: str, *, pretrain: str, trainable: bool, value_head: bool, total_steps: int,
                learning_rate: float | None = None):
    from engine.ray.role_worker import RoleConfig
    from engine.runtime.optimizer import OptimConfig
    from parallel.config import ParallelConfig

    optim = None
    if trainable:
        optim = OptimConfig(learning_rate=learning_rate or args.learning_rate, lr_warmup_ratio=args.lr_warmup_ratio,
                            lr_scheduler=args.lr_scheduler, min_lr_ratio=args.min_lr_ratio, weight_decay=args.l2,
                            adam_betas=tuple(args.adam_betas), max_norm=args.max_norm, bf16=args.bf16)
    return RoleConfig(
        name=role, pretrain=pretrain, trainable=trainable, value_head=value_head, optim=optim,
        total_steps=total_steps, seed=args.seed,
        num_ranks=getattr(args, f"{role}_num_nodes") * getattr(args, f"{role}_num_gpus_per_node"),
        parallel=ParallelConfig(
            tensor_model_parallel_size=getattr(args, f"{role}_tensor_model_parallel_size"),
            pipeline_model_parallel_size=getattr(args, f"{role}_pipeline_model_parallel_size"),
            context_parallel_size=getattr(args, f"{role}_context_parallel_size"),
        ),
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        gradient_checkpointing=args.gradient_checkpointing,
    )


def _max_positions(path: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).max_position_embeddings


def sampling_config(args, tokenizer, **overrides):
    from engine.ray.vllm_engine import SamplingConfig

    return SamplingConfig(**{
        "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.generate_max_len,
        "n_samples_per_prompt": args.n_samples_per_prompt,
        "stop_token_ids": tuple(t for t in (tokenizer.eos_token_id,) if t is not None), **overrides,
    })


def build_and_fit(args, *, sampling_overrides: dict | None = None) -> list[dict]:
    """Start the cluster pieces, run the loop, shut everything down (also on errors).

    ``sampling_overrides``: SamplingConfig fields no flag sets (benchmarks force full-length
    rollouts with ``min_new_tokens``)."""
    import ray
    from transformers import AutoTokenizer

    from engine.data.prompts import PromptDataset
    from engine.ray.colocation import make_placements, release_placements
    from engine.ray.role_group import RoleGroup
    from engine.ray.vllm_engine import VLLMEngineConfig, create_engines, shutdown_engines
    from engine.ray.weight_sync import ActorWeightSync
    from engine.rl.ppo_trainer import PPOTrainer
    from engine.rl.rewards import make_reward_sources
    from engine.runtime.checkpoint import CheckpointConfig
    from engine.runtime.logging import LoggingConfig, MetricsLogger

    config = ppo_config(args)
    tokenizer = AutoTokenizer.from_pretrained(args.pretrain)
    prompts = PromptDataset.from_config(data_config(args), tokenizer)
    pretrain_samples = load_pretrain_data(args, tokenizer)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    steps = min(len(prompts) // config.rollout_batch_size * config.num_episodes, config.max_steps or 1 << 62)
    optimizer_steps = max(steps * config.max_epochs * config.rollout_batch_size * config.n_samples_per_prompt
                          // config.train_batch_size, 1)
    started: list = []
    engines = []
    placements: dict = {}
    try:
        reward_paths = [p for p in (args.reward_pretrain or "").split(",") if p]
        role_configs = {"actor": role_config(args, "actor", pretrain=args.pretrain, trainable=True, value_head=False,
                                             total_steps=optimizer_steps)}
        if config.needs_reference:
            role_configs["ref"] = role_config(args, "ref", pretrain=args.pretrain, trainable=False, value_head=False,
                                              total_steps=1)
        for i, path in enumerate(reward_paths):
            role_configs[f"reward{i}"] = role_config(args, "reward", pretrain=path, trainable=False, value_head=True,
                                                     total_steps=1)
        if config.needs_critic:
            role_configs["critic"] = role_config(
                args, "critic", pretrain=args.critic_pretrain or (reward_paths[0] if reward_paths else args.pretrain),
                trainable=True, value_head=True, total_steps=optimizer_steps, learning_rate=args.critic_learning_rate)
        placements = make_placements(colocation_config(args), role_ranks(args, config),
                                     engine_workers=args.vllm_num_engines * args.vllm_tensor_parallel_size)
        groups = {}
        for key, role in role_configs.items():
            frozen = key == "ref" or key.startswith("reward")
            groups[key] = RoleGroup(role, placements[key], offload=args.ref_reward_offload and frozen)
            started.append(groups[key])
        actor, reference, critic = groups["actor"], groups.get("ref"), groups.get("critic")
        reward_models = [groups[f"reward{i}"] for i in range(len(reward_paths))]
        shared = placements.get("vllm")
        engines = create_engines(VLLMEngineConfig(
            pretrain=args.pretrain, num_engines=args.vllm_num_engines,
            tensor_parallel_size=args.vllm_tensor_parallel_size, enforce_eager=args.enforce_eager,
            enable_prefix_caching=args.enable_prefix_caching, dtype=args.vllm_dtype,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization, seed=args.seed,
            max_model_len=min(args.prompt_max_len + args.generate_max_len, _max_positions(args.pretrain)),
            enable_sleep_mode=args.vllm_enable_sleep,
            shared_placement_group=shared.placement_group if shared else None,
            gpu_fraction=shared.gpu_per_rank if shared else 1.0,
        ))
        sync = ActorWeightSync(actor, engines, backend=args.vllm_sync_backend,
                               bucket_bytes=args.vllm_sync_bucket_mb << 20)
        sampling = sampling_config(args, tokenizer, **(sampling_overrides or {}))
        trainer = PPOTrainer(
            config, prompts=prompts, tokenizer=tokenizer, engines=engines, actor=actor, sampling=sampling,
            sync=sync, critic=critic, reference=reference, reward_models=reward_models,
            reward_sources=make_reward_sources(args.remote_rm_url),
            logger=MetricsLogger(LoggingConfig(logging_steps=args.logging_steps, use_tensorboard=args.use_tensorboard,
                                               use_wandb=args.use_wandb, wandb_project=args.wandb_project,
                                               wandb_run_name=args.wandb_run_name)),
            checkpoint=CheckpointConfig(ckpt_path=args.ckpt_path, save_steps=args.save_steps,
                                        max_ckpt_num=args.max_ckpt_num, load_checkpoint=args.load_checkpoint),
            save_path=args.save_path, save_value_network=args.save_value_network, pretrain_samples=pretrain_samples,
            engines_sleep=args.vllm_enable_sleep,
        )
        return trainer.fit()
    finally:
        if engines:
            shutdown_engines(engines)
        for group in started:
            group.shutdown()
        release_placements(placements)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    config = ppo_config(args)  # flag errors before anything starts
    check_colocation(args, config)
    data_config(args)
    pretrain_data_config(args)
    return build_and_fit(args)


if __name__ == "__main__":
    main()
