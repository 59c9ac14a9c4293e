#!/usr/bin/env bash
# Llama-3-70B PPO with a critic, `ray job submit` to a running Ray cluster of 12 nodes x 8 GPUs of
# 80 GB (H100 SXM: NVLink 450 GB/s, 400 Gb/s IB per GPU): actor + reference on 4 nodes, critic +
# reward model on 4 nodes (each TP 8 x PP 4, sequence parallel, full recompute; reference and
# reward weights in host memory between uses), 8 vLLM engines of TP 4 on 4 nodes.
# plan: --model llama3-70b --job ppo --nodes 12 --tensor_model_parallel_size 8 --pipeline_model_parallel_size 4 --context_parallel_size 1 --recompute_granularity full --max_len 2048 --vllm_num_engines 8 --vllm_tensor_parallel_size 4 --rollout_batch_size 128 --n_samples_per_prompt 1 --generate_max_len 1024 --ref_reward_offload
# planner: peak 41.3 GB per GPU (stage 0), step ~35 s at an assumed MFU of 0.45
# Run from the repository root: RAY_ADDRESS=http://head:8265 MODEL=... RM=... PROMPTS=... bash scripts/recipes/llama3_70b_ppo.ray.sh
set -euo pipefail
MODEL=${MODEL:-/shared/out/llama3-70b-sft}
RM=${RM:-/shared/out/llama3-70b-rm}
PROMPTS=${PROMPTS:-/shared/data/prompts.jsonl}
SAVE_PATH=${SAVE_PATH:-/shared/out/llama3-70b-ppo}
role_flags() { for role in actor critic ref reward; do
  echo "--${role}_num_nodes 4 --${role}_num_gpus_per_node 8 --${role}_tensor_model_parallel_size 8" \
       "--${role}_pipeline_model_parallel_size 4 --${role}_sequence_parallel"
done; }
ray job submit --working-dir . -- python -m engine.cli.train_ppo_ray \
  --pretrain "$MODEL" --reward_pretrain "$RM" --prompt_data "$PROMPTS" --save_path "$SAVE_PATH" \
  $(role_flags) --colocate_actor_ref --colocate_critic_reward --ref_reward_offload \
  --vllm_num_engines 8 --vllm_tensor_parallel_size 4 \
  --bf16 --recompute_granularity full --advantage_estimator gae \
  --rollout_batch_size 128 --n_samples_per_prompt 1 --train_batch_size 128 --micro_train_batch_size 1 \
  --prompt_max_len 1024 --generate_max_len 1024 --max_len 2048 --apply_chat_template "$@"
