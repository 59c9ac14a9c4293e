#!/usr/bin/env bash
# Llama-3-70B DPO, Slurm: 4 nodes x 8 GPUs of 80 GB (H100 SXM: NVLink 450 GB/s, 400 Gb/s IB per GPU).
# Layout: TP 8 x PP 4, sequence parallel, full recompute; the reference is a frozen copy on the same GPUs.
# plan: --model llama3-70b --job dpo --nodes 4 --tensor_model_parallel_size 8 --pipeline_model_parallel_size 4 --context_parallel_size 1 --recompute_granularity full --train_batch_size 128 --micro_train_batch_size 1 --max_len 4096
# planner: peak 47.2 GB per GPU (stage 0), step ~66 s at an assumed MFU of 0.45
# Submit from the repository root: MODEL=<SFT output> DATA=... bash scripts/recipes/llama3_70b_dpo.slurm.sh
set -euo pipefail
MODEL=${MODEL:-/shared/out/llama3-70b-sft}
DATA=${DATA:-/shared/data/preferences.jsonl}
TRAINER=dpo PRETRAIN=$MODEL DATASET=$DATA TP=8 PP=4 CP=1 TRAIN_BATCH_SIZE=128 MICRO_TRAIN_BATCH_SIZE=1 \
MAX_LEN=4096 LEARNING_RATE=5e-7 \
  sbatch --nodes 4 --gpus-per-node 8 scripts/slurm/train_offline.sbatch \
  --bf16 --sequence_parallel --recompute_granularity full --beta 0.1 --apply_chat_template "$@"
