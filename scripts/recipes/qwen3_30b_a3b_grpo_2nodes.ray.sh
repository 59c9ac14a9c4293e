#!/usr/bin/env bash
# GRPO on Qwen3-30B-A3B (128 experts, top-8) on 2 nodes x 8 GPUs of 80 GB, `ray job submit`: actor +
# reference and 4 vLLM engines of TP 4 colocated on all 16 GPUs; the actor is EP 8 (16 experts per
# rank, expert TP 1), TP 1, DP 16, full recompute, router replay; rule / remote rewards, 8 samples per prompt.
# plan: --model qwen3-30b-a3b --job grpo --nodes 2 --tensor_model_parallel_size 1 --pipeline_model_parallel_size 1 --context_parallel_size 1 --expert_model_parallel_size 8 --recompute_granularity full --max_len 4096 --colocate_all_models --vllm_num_engines 4 --vllm_tensor_parallel_size 4 --vllm_gpu_memory_utilization 0.5 --rollout_batch_size 64 --n_samples_per_prompt 8 --generate_max_len 3072 --ref_reward_offload --micro_train_batch_size 2
# planner: peak 60.7 GB per GPU (stage 0), step ~38.0 s at an assumed MFU of 0.45
# Run from the repository root: RAY_ADDRESS=http://head:8265 MODEL=... PROMPTS=... REWARD=<url or .py> bash scripts/recipes/qwen3_30b_a3b_grpo_2nodes.ray.sh
set -euo pipefail
MODEL=${MODEL:-/shared/models/Qwen3-30B-A3B}
PROMPTS=${PROMPTS:-/shared/data/math_prompts.jsonl}
REWARD=${REWARD:-/shared/reward_func.py}
SAVE_PATH=${SAVE_PATH:-/shared/out/qwen3-30b-a3b-grpo}
role_flags() { for role in actor ref; do
  echo "--${role}_num_nodes 2 --${role}_num_gpus_per_node 8 --${role}_expert_model_parallel_size 8"
done; }
# Router replay (--router_replay: the engines' routing replayed in the actor's forwards; GRPO on this
# model is reported to collapse without it, NVIDIA/Megatron-LM issue 4168), also in the routers that
# the full recompute this layout needs (~44 GB of activations per GPU without it) runs again in
# backward: each replays its own micro-batch's routing. The record costs ~3 MB per 4096-token sample.
ray job submit --working-dir . -- python -m engine.cli.train_ppo_ray \
  --pretrain "$MODEL" --remote_rm_url "$REWARD" --prompt_data "$PROMPTS" --save_path "$SAVE_PATH" \
  $(role_flags) --colocate_all_models --vllm_enable_sleep --ref_reward_offload \
  --vllm_num_engines 4 --vllm_tensor_parallel_size 4 --vllm_gpu_memory_utilization 0.5 \
  --bf16 --recompute_granularity full --advantage_estimator grpo --init_kl_coef 0.001 --use_kl_loss \
  --aux_loss_coef 0.001 --router_replay \
  --rollout_batch_size 64 --n_samples_per_prompt 8 --train_batch_size 512 --micro_train_batch_size 2 \
  --prompt_max_len 1024 --generate_max_len 3072 --max_len 4096 --apply_chat_template "$@"
