#!/usr/bin/env bash
# Mixtral-8x7B SFT with expert parallelism, Slurm: 2 nodes x 8 GPUs of 80 GB (H100 SXM: NVLink
# 450 GB/s, 400 Gb/s IB per GPU). Layout: PP 4 x EP 4 (two experts per rank, expert TP 1), DP 4,
# full recompute: 18 GB of headroom per GPU for longer samples (the planner's search lists faster, fuller ones).
# plan: --model mixtral-8x7b --job sft --nodes 2 --tensor_model_parallel_size 1 --pipeline_model_parallel_size 4 --context_parallel_size 1 --expert_model_parallel_size 4 --recompute_granularity full --train_batch_size 128 --max_len 4096
# planner: peak 57.6 GB per GPU (stage 0), step ~9 s at an assumed MFU of 0.45
# Submit from the repository root: MODEL=... DATA=... bash scripts/recipes/mixtral_8x7b_sft_ep.slurm.sh
set -euo pipefail
MODEL=${MODEL:-/shared/models/Mixtral-8x7B-v0.1}
DATA=${DATA:-/shared/data/sft.jsonl}
TRAINER=sft PRETRAIN=$MODEL DATASET=$DATA TP=1 PP=4 CP=1 TRAIN_BATCH_SIZE=128 MICRO_TRAIN_BATCH_SIZE=1 \
MAX_LEN=4096 LEARNING_RATE=5e-6 \
  sbatch --nodes 2 --gpus-per-node 8 scripts/slurm/train_offline.sbatch \
  --expert_model_parallel_size 4 --expert_tensor_parallel_size 1 --bf16 --recompute_granularity full \
  --aux_loss_coef 0.01 --apply_chat_template "$@"
