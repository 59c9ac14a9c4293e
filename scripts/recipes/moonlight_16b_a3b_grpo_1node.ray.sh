#!/usr/bin/env bash
# GRPO on Moonlight-16B-A3B (DeepSeek-V3 architecture: latent attention, 64 experts top-6, 2 shared) on
# one node of 8 GPUs of 80 GB, `ray job submit`: actor + reference and 4 vLLM engines of TP 2 colocated on
# all 8 GPUs; the actor is EP 8 (8 experts per rank, expert TP 1), TP 1, DP 8, full recompute; rule /
# remote rewards, 8 samples per prompt. The router's expert bias stays fixed (no
# --moe_router_bias_update_rate: a moving router is one more train-vs-rollout mismatch). Local layer spec:
# Moonlight's rms_norm_eps (1e-5) differs from HF's latent norms' (1e-6), which TE's fused norms cannot hold.
# vLLM's MLA caches 576 values per token and layer (the latent), not K and V (the planner's KV figure).
# plan: --model moonlight-16b-a3b --job grpo --nodes 1 --tensor_model_parallel_size 1 --pipeline_model_parallel_size 1 --context_parallel_size 1 --expert_model_parallel_size 8 --recompute_granularity full --max_len 4096 --colocate_all_models --vllm_num_engines 4 --vllm_tensor_parallel_size 2 --vllm_gpu_memory_utilization 0.5 --rollout_batch_size 64 --n_samples_per_prompt 8 --generate_max_len 3072 --ref_reward_offload --micro_train_batch_size 2
# planner: peak 50.6 GB per GPU (stage 0), step ~44.8 s at an assumed MFU of 0.45
# Run from the repository root: RAY_ADDRESS=http://head:8265 MODEL=... PROMPTS=... REWARD=<url or .py> bash scripts/recipes/moonlight_16b_a3b_grpo_1node.ray.sh
set -euo pipefail
MODEL=${MODEL:-/shared/models/Moonlight-16B-A3B-Instruct}
PROMPTS=${PROMPTS:-/shared/data/math_prompts.jsonl}
REWARD=${REWARD:-/shared/reward_func.py}
SAVE_PATH=${SAVE_PATH:-/shared/out/moonlight-16b-a3b-grpo}
role_flags() { for role in actor ref; do
  echo "--${role}_num_nodes 1 --${role}_num_gpus_per_node 8 --${role}_expert_model_parallel_size 8"
done; }
ray job submit --working-dir . -- python -m engine.cli.train_ppo_ray \
  --pretrain "$MODEL" --remote_rm_url "$REWARD" --prompt_data "$PROMPTS" --save_path "$SAVE_PATH" \
  $(role_flags) --colocate_all_models --vllm_enable_sleep --ref_reward_offload \
  --vllm_num_engines 4 --vllm_tensor_parallel_size 2 --vllm_gpu_memory_utilization 0.5 \
  --bf16 --recompute_granularity full --transformer_impl local --advantage_estimator grpo \
  --init_kl_coef 0.001 --use_kl_loss \
  --rollout_batch_size 64 --n_samples_per_prompt 8 --train_batch_size 512 --micro_train_batch_size 2 \
  --prompt_max_len 1024 --generate_max_len 3072 --max_len 4096 --apply_chat_template "$@"
