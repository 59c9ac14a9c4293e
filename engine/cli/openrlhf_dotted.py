"""OpenRLHF 0.10+'s dotted flag names, each a second spelling of the flat name it renamed.

OpenRLHF 0.10 (April 2026, commit ed62d0e2; unchanged in 0.11) renamed its flags to a dotted
hierarchy: ``--pretrain`` became ``--model.model_name_or_path`` (``--actor.model_name_or_path`` in
``train_ppo_ray``), ``--zero_stage`` ``--ds.zero_stage``, ``--advantage_estimator``
``--algo.advantage.estimator``. :data:`RENAMED` maps each dotted name to the flat flag it stands for
here: OpenRLHF's flat name (an option, alias or entry of ``openrlhf_compat.TABLE``), or, where
OpenRLHF renamed a concept between 2025 and 0.10 (``--dataset_split``, ``--max_new_tokens``), the
flag this engine spells it with. ``engine/cli/options.py`` gives the parser of each of OpenRLHF's
CLIs (:data:`CLIS`) the dotted twin of each flag it has, with the same effect (aliases on the same
argparse action: the last one given wins, as for every alias); a dotted name whose flat flag a job
does not have is unrecognized there, as an unknown flat flag is. Entries of the table given dotted
print their notice (or refusal) naming the spelling typed. :data:`BY_VALUE` holds the 0.10+ flags
that take a value where 2025 had a switch (``--ds.param_dtype bf16``: ``--bf16``).

Not here (so unrecognized, as any flag OpenRLHF added after March 2025 that has no option here):
concepts without a counterpart in this engine (``--rollout.max_tokens_per_gpu``: one
``--max_tokens_per_gpu`` budgets scoring and training here; ``--optim`` / ``--*.muon.*``, ``--adam.eps``,
``--ds.experts_implementation``, ...), and 0.10's per-role optimizer settings of the critic
(``--critic.adam.betas``, ...): here the actor's (``--actor.adam.betas``, the 2025 ``--adam_betas``)
set both roles, as the 2025 flags did; only the learning rate is the critic's own.
"""
from __future__ import annotations

from engine.cli.openrlhf_compat import EVERY, RL

# The CLIs that take the dotted names: OpenRLHF's (a module name under engine/cli or tools/convert).
CLIS = (*EVERY, "lora_combiner")
# 0.10+ spells the trained model's settings per role in train_ppo_ray and per model elsewhere.
RL_ONLY, NOT_RL = ("actor.", "critic."), ("model.", "adam.")

RENAMED: dict[str, str] = {
    # ----- checkpoints and logging ------------------------------------------------------------------
    "ckpt.output_dir": "save_path",
    "ckpt.save_steps": "save_steps",
    "ckpt.save_hf": "save_hf_ckpt",
    "ckpt.disable_ds": "disable_ds_ckpt",
    "ckpt.path": "ckpt_path",
    "ckpt.max_num": "max_ckpt_num",
    "ckpt.max_mem": "max_ckpt_mem",
    "ckpt.load_enable": "load_checkpoint",
    "logger.logging_steps": "logging_steps",
    "logger.tensorboard_dir": "use_tensorboard",
    "logger.wandb.key": "use_wandb",
    "logger.wandb.org": "wandb_org",
    "logger.wandb.group": "wandb_group",
    "logger.wandb.project": "wandb_project",
    "logger.wandb.run_name": "wandb_run_name",
    "eval.steps": "eval_steps",
    # ----- DeepSpeed, kernels, parallelism ----------------------------------------------------------
    "ds.zero_stage": "zero_stage",
    "ds.zpg": "zpg",
    "ds.adam_offload": "adam_offload",
    "ds.use_universal_ckpt": "use_ds_universal_ckpt",
    "ds.use_liger_kernel": "use_liger_kernel",
    "ds.grad_accum_dtype": "grad_accum_dtype",
    "ds.overlap_comm": "overlap_comm",
    "ds.enable_sleep": "deepspeed_enable_sleep",
    "ds.ring_attn_size": "ring_attn_size",
    "ds.ring_attn_head_stride": "ring_head_stride",
    "ds.packing_samples": "packing_samples",
    "ds.value_head_prefix": "value_head_prefix",
    "ds.load_in_4bit": "load_in_4bit",
    "ds.lora.rank": "lora_rank",
    "ds.lora.alpha": "lora_alpha",
    "ds.lora.target_modules": "target_modules",
    "ds.lora.dropout": "lora_dropout",
    # ----- model ------------------------------------------------------------------------------------
    "model.model_name_or_path": "pretrain",
    "model.gradient_checkpointing_enable": "gradient_checkpointing",
    "model.gradient_checkpointing_reentrant": "gradient_checkpointing_use_reentrant",
    "model.aux_loss_coef": "aux_loss_coef",
    "model.pretrain_mode_enable": "pretrain_mode",
    "model.compute_fp32_loss_enable": "compute_fp32_loss",
    "model.margin_loss_enable": "margin_loss",
    "model.loss_type": "loss",
    "model.beta": "beta",
    "model.ipo_enable": "ipo",
    "model.label_smoothing": "label_smoothing",
    "model.nll_loss_coef": "nll_loss_coef",
    "ref.model_name_or_path": "ref_pretrain",
    "ref.offload": "ref_offload",  # train_dpo's; train_ppo_ray's --ref.offload / --reward.offload have no twin
    # ----- optimizer and training -------------------------------------------------------------------
    "adam.lr": "learning_rate",
    "adam.betas": "adam_betas",
    "adam.weight_decay": "l2",
    "train.batch_size": "train_batch_size",
    "train.micro_batch_size": "micro_train_batch_size",
    "train.max_epochs": "max_epochs",
    "train.seed": "seed",
    "train.agent_func_path": "agent_func_path",
    "train.full_determinism_enable": "full_determinism",
    # ----- data -------------------------------------------------------------------------------------
    "data.dataset": "dataset",
    "data.dataset_probs": "dataset_probs",
    "data.dataset_split": "train_split",  # 2025's --train_split (batch_inference's --dataset_split)
    "data.max_samples": "max_samples",
    "data.max_len": "max_len",
    "data.multiturn": "multiturn",
    "data.input_key": "input_key",
    "data.output_key": "output_key",
    "data.label_key": "label_key",
    "data.prompt_key": "prompt_key",
    "data.chosen_key": "chosen_key",
    "data.rejected_key": "rejected_key",
    "data.input_template": "input_template",
    "data.apply_chat_template": "apply_chat_template",
    "data.tokenizer_chat_template": "tokenizer_chat_template",
    "data.disable_fast_tokenizer": "disable_fast_tokenizer",
    "data.prompt_dataset": "prompt_data",
    "data.prompt_probs": "prompt_data_probs",
    "data.prompt_split": "prompt_split",
    "eval.dataset": "eval_dataset",
    "eval.split": "eval_split",
    "eval.temperature": "eval_temperature",
    "eval.n_samples_per_prompt": "eval_n_samples_per_prompt",
    # ----- train_ppo_ray: roles and placement -------------------------------------------------------
    **{f"{role}.{what}": f"{role}_{what}" for role in ("actor", "critic", "ref", "reward")
       for what in ("num_nodes", "num_gpus_per_node")},
    "actor.model_name_or_path": "pretrain",
    "critic.model_name_or_path": "critic_pretrain",
    "reward.model_name_or_path": "reward_pretrain",  # also serve_rm's
    "reward.remote_url": "remote_rm_url",
    "reward.normalize_enable": "normalize_reward",  # also serve_rm's
    "reward.clip_range": "reward_clip_range",
    "train.colocate_actor_ref": "colocate_actor_ref",
    "train.colocate_critic_reward": "colocate_critic_reward",
    "train.colocate_all": "colocate_all_models",
    "train.num_episodes": "num_episodes",
    "train.async_enable": "async_train",
    "train.partial_rollout_enable": "partial_rollout",
    "train.enable_ema": "enable_ema",
    "train.ema_beta": "ema_beta",
    # ----- train_ppo_ray: the actor's model and optimizer (the flat ones set the critic's too) -----
    "actor.gradient_checkpointing_enable": "gradient_checkpointing",
    "actor.gradient_checkpointing_reentrant": "gradient_checkpointing_use_reentrant",
    "actor.aux_loss_coef": "aux_loss_coef",
    "actor.adam.lr": "actor_learning_rate",
    "actor.policy_loss_type": "policy_loss_type",
    "actor.entropy_coef": "entropy_coef",
    "critic.adam.lr": "critic_learning_rate",
    "actor.adam.betas": "adam_betas",
    "actor.adam.weight_decay": "l2",
    "actor.lr_scheduler": "lr_scheduler",
    "actor.lr_warmup_ratio": "lr_warmup_ratio",
    "actor.min_lr_ratio": "min_lr_ratio",
    "actor.max_norm": "max_norm",
    # ----- train_ppo_ray: vLLM and rollouts ---------------------------------------------------------
    "vllm.num_engines": "vllm_num_engines",
    "vllm.tensor_parallel_size": "vllm_tensor_parallel_size",
    "vllm.sync_backend": "vllm_sync_backend",
    "vllm.sync_with_ray": "vllm_sync_with_ray",
    "vllm.enable_prefix_caching": "enable_prefix_caching",
    "vllm.enforce_eager": "enforce_eager",
    "vllm.enable_sleep": "vllm_enable_sleep",
    "vllm.gpu_memory_utilization": "vllm_gpu_memory_utilization",
    "rollout.batch_size": "rollout_batch_size",
    "rollout.micro_batch_size": "micro_rollout_batch_size",
    "rollout.n_samples_per_prompt": "n_samples_per_prompt",
    "rollout.max_new_tokens": "generate_max_len",  # 2025's --generate_max_len (batch_inference's --max_new_tokens)
    "rollout.temperature": "temperature",
    "rollout.top_p": "top_p",
    # ----- train_ppo_ray: the algorithm -------------------------------------------------------------
    "algo.advantage.estimator": "advantage_estimator",
    "algo.advantage.gamma": "gamma",
    "algo.advantage.lambd": "lambd",
    "algo.advantage.no_std_norm": "no_advantage_std_norm",
    "algo.advantage.is_correction_enable": "vllm_is_correction",
    "algo.advantage.is_correction_threshold": "vllm_is_truncated_threshold",
    "algo.advantage.is_correction_type": "vllm_is_correction_type",
    "algo.kl.init_coef": "init_kl_coef",
    "algo.kl.target": "kl_target",
    "algo.kl.horizon": "kl_horizon",
    "algo.kl.estimator": "kl_estimator",
    "algo.kl.use_loss": "use_kl_loss",
    "algo.dynamic_filtering_enable": "dynamic_filtering",
    "algo.dynamic_filtering_range": "dynamic_filtering_reward_range",
    "reward.overlong_buffer_len": "overlong_buffer_len",
    "reward.overlong_penalty_factor": "overlong_penalty_factor",
    "train.dynamic_batch_enable": "use_dynamic_batch_size",
    "train.max_tokens_per_gpu": "max_tokens_per_gpu",  # scoring and training (0.11's rollout.* budget: not here)
    "actor.eps_clip": "eps_clip",
    "actor.eps_clip_low_high": "eps_clip_low_high",
    "actor.dual_clip": "dual_clip",
    "critic.value_clip": "value_clip",
    "critic.freezing_steps": "freezing_actor_steps",
    "critic.save_value_network": "save_value_network",
}

# 0.10+ flags with a value where 2025 had a switch: value -> whether it means the switch given
# (False: as if it were not given). Other values are an error naming the dotted flag.
BY_VALUE: dict[str, tuple[str, dict[str, bool]]] = {
    # 2025 without --bf16 trained in fp16 (DeepSpeed); here without --bf16 is this engine's default
    "ds.param_dtype": ("bf16", {"bf16": True, "fp16": False}),
    # a flash-attention kernel is 2025's --flash_attn (its notice says how the kernel is chosen here)
    "ds.attn_implementation": ("flash_attn", {"flash_attention_2": True, "flash_attention_3": True,
                                              "kernels-community/vllm-flash-attn3": True, "sdpa": False,
                                              "eager": False}),
}


def twins(flat_names: set[str], cli: str) -> dict[str, tuple[str, ...]]:
    """The dotted spellings in CLI ``cli`` of those of ``flat_names`` that OpenRLHF 0.10+ renamed (flat -> dotted)."""
    out: dict[str, list[str]] = {}
    for dotted, flat in RENAMED.items():
        if dotted.startswith(RL_ONLY if cli not in RL else NOT_RL):
            continue
        if flat in flat_names:
            out.setdefault(flat, []).append(dotted)
    return {flat: tuple(names) for flat, names in out.items()}
