#!/usr/bin/env bash
# GRPO on Llama-3-70B, Slurm: 6 nodes x 8 GPUs of 80 GB (H100 SXM: NVLink 450 GB/s, 400 Gb/s IB per
# GPU): actor + reference on 4 nodes (TP 8 x PP 4, sequence parallel, full recompute, reference
# weights in host memory between uses), 4 vLLM engines of TP 4 on 2 nodes; rule / remote rewards.
# plan: --model llama3-70b --job grpo --nodes 6 --tensor_model_parallel_size 8 --pipeline_model_parallel_size 4 --context_parallel_size 1 --recompute_granularity full --max_len 2048 --vllm_num_engines 4 --vllm_tensor_parallel_size 4 --rollout_batch_size 64 --n_samples_per_prompt 8 --generate_max_len 1024 --ref_reward_offload
# planner: peak 41.3 GB per GPU (stage 0), step ~94 s at an assumed MFU of 0.45
# Submit from the repository root: MODEL=... PROMPTS=... REWARD=<url or .py> bash scripts/recipes/llama3_70b_grpo.slurm.sh
set -euo pipefail
MODEL=${MODEL:-/shared/out/llama3-70b-sft}
PROMPTS=${PROMPTS:-/shared/data/math_prompts.jsonl}
REWARD=${REWARD:-/shared/reward_func.py}
PRETRAIN=$MODEL PROMPT_DATA=$PROMPTS REMOTE_RM_URL=$REWARD ADVANTAGE_ESTIMATOR=grpo \
ACTOR_NUM_NODES=4 ACTOR_TP=8 ACTOR_PP=4 VLLM_NUM_ENGINES=4 VLLM_TP=4 \
N_SAMPLES_PER_PROMPT=8 ROLLOUT_BATCH_SIZE=64 TRAIN_BATCH_SIZE=512 MICRO_TRAIN_BATCH_SIZE=1 \
PROMPT_MAX_LEN=1024 GENERATE_MAX_LEN=1024 \
  sbatch --nodes 6 --gpus-per-node 8 scripts/slurm/train_ppo_ray.sbatch \
  --actor_sequence_parallel --ref_num_nodes 4 --ref_tensor_model_parallel_size 8 --ref_pipeline_model_parallel_size 4 \
  --ref_sequence_parallel --colocate_actor_ref --ref_reward_offload --init_kl_coef 0.001 --use_kl_loss \
  --bf16 --recompute_granularity full --max_len 2048 --apply_chat_template "$@"
