#!/usr/bin/env bash
# GRPO on GLM-4.5-Air (106B-A12B: 46 layers, 128 experts top-8 + 1 shared, GQA with partial rotary), Slurm:
# 6 nodes x 8 GPUs of 80 GB (H100 SXM: NVLink 450 GB/s, 400 Gb/s IB per GPU): actor + reference on 4 nodes
# (TP 2 x PP 2 x EP 16, 8 experts per rank, expert TP 1, sequence parallel, full recompute, reference
# weights in host memory between uses), 2 vLLM engines of TP 8 on 2 nodes; rule / remote rewards. The
# router's expert bias stays fixed (HF's, exported and synced as it is).
# plan: --model glm-4.5-air --job grpo --nodes 6 --tensor_model_parallel_size 2 --pipeline_model_parallel_size 2 --context_parallel_size 1 --expert_model_parallel_size 16 --recompute_granularity full --max_len 4096 --vllm_num_engines 2 --vllm_tensor_parallel_size 8 --rollout_batch_size 64 --n_samples_per_prompt 8 --generate_max_len 3072 --ref_reward_offload
# planner: peak 73.2 GB per GPU (stage 0), step ~135.9 s at an assumed MFU of 0.45
# Submit from the repository root: MODEL=... PROMPTS=... REWARD=<url or .py> bash scripts/recipes/glm45_air_grpo.slurm.sh
set -euo pipefail
MODEL=${MODEL:-/shared/models/GLM-4.5-Air}
PROMPTS=${PROMPTS:-/shared/data/math_prompts.jsonl}
REWARD=${REWARD:-/shared/reward_func.py}
PRETRAIN=$MODEL PROMPT_DATA=$PROMPTS REMOTE_RM_URL=$REWARD ADVANTAGE_ESTIMATOR=grpo \
ACTOR_NUM_NODES=4 ACTOR_TP=2 ACTOR_PP=2 VLLM_NUM_ENGINES=2 VLLM_TP=8 \
N_SAMPLES_PER_PROMPT=8 ROLLOUT_BATCH_SIZE=64 TRAIN_BATCH_SIZE=512 MICRO_TRAIN_BATCH_SIZE=1 \
PROMPT_MAX_LEN=1024 GENERATE_MAX_LEN=3072 \
  sbatch --nodes 6 --gpus-per-node 8 scripts/slurm/train_ppo_ray.sbatch \
  --actor_sequence_parallel --actor_expert_model_parallel_size 16 \
  --ref_num_nodes 4 --ref_tensor_model_parallel_size 2 --ref_pipeline_model_parallel_size 2 \
  --ref_expert_model_parallel_size 16 --ref_sequence_parallel --colocate_actor_ref --ref_reward_offload \
  --init_kl_coef 0.001 --use_kl_loss \
  --bf16 --recompute_granularity full --max_len 4096 --apply_chat_template "$@"
