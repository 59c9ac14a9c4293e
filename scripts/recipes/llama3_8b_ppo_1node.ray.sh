#!/usr/bin/env bash
# PPO on a 7-8B model (Llama-3-8B) on one node of 8 GPUs of 80 GB, `ray job submit`: every model and
# 4 vLLM engines of TP 2 colocated on all 8 GPUs (TP 2, DP 4, sequence parallel, full recompute);
# the engines sleep while the models train, the training state is parked while they generate.
# plan: --model llama3-8b --job ppo --nodes 1 --tensor_model_parallel_size 2 --pipeline_model_parallel_size 1 --context_parallel_size 1 --recompute_granularity full --max_len 2048 --colocate_all_models --vllm_num_engines 4 --vllm_tensor_parallel_size 2 --vllm_gpu_memory_utilization 0.5 --rollout_batch_size 128 --n_samples_per_prompt 4 --generate_max_len 1024 --ref_reward_offload --micro_train_batch_size 2
# planner: peak 71.6 GB per GPU (stage 0), step ~60 s at an assumed MFU of 0.45
# Run from the repository root: RAY_ADDRESS=http://head:8265 MODEL=... RM=... PROMPTS=... bash scripts/recipes/llama3_8b_ppo_1node.ray.sh
set -euo pipefail
MODEL=${MODEL:-/shared/models/Meta-Llama-3-8B-Instruct}
RM=${RM:-/shared/out/llama3-8b-rm}
PROMPTS=${PROMPTS:-/shared/data/prompts.jsonl}
SAVE_PATH=${SAVE_PATH:-/shared/out/llama3-8b-ppo}
role_flags() { for role in actor critic ref reward; do
  echo "--${role}_num_nodes 1 --${role}_num_gpus_per_node 8 --${role}_tensor_model_parallel_size 2 --${role}_sequence_parallel"
done; }
ray job submit --working-dir . -- python -m engine.cli.train_ppo_ray \
  --pretrain "$MODEL" --reward_pretrain "$RM" --prompt_data "$PROMPTS" --save_path "$SAVE_PATH" \
  $(role_flags) --colocate_all_models --vllm_enable_sleep --ref_reward_offload \
  --vllm_num_engines 4 --vllm_tensor_parallel_size 2 --vllm_gpu_memory_utilization 0.5 \
  --bf16 --recompute_granularity full --advantage_estimator gae \
  --rollout_batch_size 128 --n_samples_per_prompt 4 --train_batch_size 128 --micro_train_batch_size 2 \
  --prompt_max_len 1024 --generate_max_len 1024 --max_len 2048 --apply_chat_template "$@"
