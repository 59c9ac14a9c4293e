#!/usr/bin/env bash
# GRPO on Qwen3-8B on one node of 8 GPUs of 80 GB, `ray job submit`: actor + reference and 4 vLLM
# engines of TP 2 colocated on all 8 GPUs (TP 2, DP 4, sequence parallel, full recompute); the engines
# sleep while the actor trains; rule / remote rewards (no reward model), 8 samples per prompt.
# plan: --model qwen3-8b --job grpo --nodes 1 --tensor_model_parallel_size 2 --pipeline_model_parallel_size 1 --context_parallel_size 1 --recompute_granularity full --max_len 4096 --colocate_all_models --vllm_num_engines 4 --vllm_tensor_parallel_size 2 --vllm_gpu_memory_utilization 0.5 --rollout_batch_size 64 --n_samples_per_prompt 8 --generate_max_len 3072 --ref_reward_offload --micro_train_batch_size 2
# planner: peak 40.8 GB per GPU (stage 0), step ~82.7 s at an assumed MFU of 0.45
# Run from the repository root: RAY_ADDRESS=http://head:8265 MODEL=... PROMPTS=... REWARD=<url or .py> bash scripts/recipes/qwen3_8b_grpo_1node.ray.sh
set -euo pipefail
MODEL=${MODEL:-/shared/models/Qwen3-8B}
PROMPTS=${PROMPTS:-/shared/data/math_prompts.jsonl}
REWARD=${REWARD:-/shared/reward_func.py}
SAVE_PATH=${SAVE_PATH:-/shared/out/qwen3-8b-grpo}
role_flags() { for role in actor ref; do
  echo "--${role}_num_nodes 1 --${role}_num_gpus_per_node 8 --${role}_tensor_model_parallel_size 2 --${role}_sequence_parallel"
done; }
ray job submit --working-dir . -- python -m engine.cli.train_ppo_ray \
  --pretrain "$MODEL" --remote_rm_url "$REWARD" --prompt_data "$PROMPTS" --save_path "$SAVE_PATH" \
  $(role_flags) --colocate_all_models --vllm_enable_sleep --ref_reward_offload \
  --vllm_num_engines 4 --vllm_tensor_parallel_size 2 --vllm_gpu_memory_utilization 0.5 \
  --bf16 --recompute_granularity full --advantage_estimator grpo --init_kl_coef 0.001 --use_kl_loss \
  --rollout_batch_size 64 --n_samples_per_prompt 8 --train_batch_size 512 --micro_train_batch_size 2 \
  --prompt_max_len 1024 --generate_max_len 3072 --max_len 4096 --apply_chat_template "$@"
