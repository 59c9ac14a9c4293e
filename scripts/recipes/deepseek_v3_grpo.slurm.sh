#!/usr/bin/env bash
# GRPO on DeepSeek-V3 / R1 (671B-A37B: 61 layers, latent attention, 256 experts top-8 in 4 of 8 groups + 1
# shared; also Kimi-K2-class models), Slurm: 40 nodes x 8 GPUs of 80 GB (H100 SXM: NVLink 450 GB/s, 400 Gb/s
# IB per GPU): actor + reference on 32 nodes (TP 1 x PP 16 x EP 16, DP 16: the 61 layers split unevenly as
# 3 + 14 x 4 + 2 -- the three dense layers beside the embedding, the output layer on a lighter last stage --
# 16 experts per rank, expert TP 1, full recompute, reference weights in host memory between uses; the
# planner's TP 8 x PP 1 x EP 256 fits too at 63.1 GB but takes ~264 s), 2 vLLM engines of TP 32 on 8 nodes, bf16
# (load the FP8 checkpoint dequantised to bf16); rule / remote rewards. The router's expert bias stays fixed.
# vLLM's MLA caches 576 values per token and layer (the latent), not K and V (the planner's KV figure).
# plan: --model deepseek-v3 --job grpo --nodes 40 --tensor_model_parallel_size 1 --pipeline_model_parallel_size 16 --decoder_first_pipeline_num_layers 3 --decoder_last_pipeline_num_layers 2 --context_parallel_size 1 --expert_model_parallel_size 16 --recompute_granularity full --max_len 4096 --vllm_num_engines 2 --vllm_tensor_parallel_size 32 --rollout_batch_size 64 --n_samples_per_prompt 8 --generate_max_len 3072 --ref_reward_offload
# planner: peak 64.1 GB per GPU (stage 1), step ~190.6 s at an assumed MFU of 0.45
# Submit from the repository root: MODEL=... PROMPTS=... REWARD=<url or .py> bash scripts/recipes/deepseek_v3_grpo.slurm.sh
set -euo pipefail
MODEL=${MODEL:-/shared/models/DeepSeek-V3-bf16}
PROMPTS=${PROMPTS:-/shared/data/math_prompts.jsonl}
REWARD=${REWARD:-/shared/reward_func.py}
PRETRAIN=$MODEL PROMPT_DATA=$PROMPTS REMOTE_RM_URL=$REWARD ADVANTAGE_ESTIMATOR=grpo \
ACTOR_NUM_NODES=32 ACTOR_TP=1 ACTOR_PP=16 VLLM_NUM_ENGINES=2 VLLM_TP=32 \
N_SAMPLES_PER_PROMPT=8 ROLLOUT_BATCH_SIZE=64 TRAIN_BATCH_SIZE=512 MICRO_TRAIN_BATCH_SIZE=1 \
PROMPT_MAX_LEN=1024 GENERATE_MAX_LEN=3072 \
  sbatch --nodes 40 --gpus-per-node 8 scripts/slurm/train_ppo_ray.sbatch \
  --actor_expert_model_parallel_size 16 \
  --actor_decoder_first_pipeline_num_layers 3 --actor_decoder_last_pipeline_num_layers 2 \
  --ref_num_nodes 32 --ref_tensor_model_parallel_size 1 --ref_pipeline_model_parallel_size 16 \
  --ref_decoder_first_pipeline_num_layers 3 --ref_decoder_last_pipeline_num_layers 2 \
  --ref_expert_model_parallel_size 16 --colocate_actor_ref --ref_reward_offload \
  --init_kl_coef 0.001 --use_kl_loss \
  --bf16 --recompute_granularity full --max_len 4096 --apply_chat_template "$@"
