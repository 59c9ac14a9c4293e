#!/usr/bin/env bash
# Rejection sampling (best-of-n) loop, OpenRLHF-style: for ITERS iterations,
#   generate BEST_OF_N samples per prompt (vLLM) -> score with the reward model -> keep the best per
#   prompt -> SFT on them (Megatron); each iteration's model is the next one's policy.
#
#   bash scripts/rejection_sampling.sh                     # tiny default on CPU, 1 iteration
#   POLICY=sft_hf REWARD_MODEL=rm_hf PROMPTS=prompts.jsonl INPUT_KEY=question ITERS=3 BEST_OF_N=8 \
#     ROLLOUT_BATCH_SIZE=1024 TRAIN_BATCH_SIZE=128 MICRO_TRAIN_BATCH_SIZE=4 \
#     GEN_ARGS="--apply_chat_template --vllm_num_engines 4" TRAIN_ARGS="--tensor_model_parallel_size 2" \
#     bash scripts/rejection_sampling.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
source scripts/_loop_common.sh

for ((iter = 0; iter < ITERS; iter++)); do
  out=$WORKDIR/iter$iter
  generate_and_score "$iter" "$out" rs best.jsonl
  # "input" is the rendered prompt already: no template on top (OpenRLHF's script passes the same).
  "$PY" -m engine.cli.train_sft --pretrain "$POLICY" --dataset "$out/best.jsonl" --input_key input --output_key output \
    --input_template "" \
    --train_batch_size "$TRAIN_BATCH_SIZE" --micro_train_batch_size "$MICRO_TRAIN_BATCH_SIZE" \
    --save_path "$out/model" $TRAIN_ARGS
  POLICY=$out/model
  echo "iteration $iter done: $POLICY"
done
echo "final model: $POLICY"
