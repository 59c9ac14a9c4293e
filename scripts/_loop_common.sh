# Sourced by scripts/rejection_sampling.sh and scripts/iterative_dpo.sh. When POLICY / REWARD_MODEL /
# PROMPTS are not given, build a tiny vLLM-loadable policy (head_dim 32), a reward model made from
# it, and an arithmetic prompt set in WORKDIR (no downloads; runs on CPU).
PY=${PY:-.venv/bin/python}
WORKDIR=${WORKDIR:-$(mktemp -d -t rlhf_loop.XXXXXX)}
if [[ -z "${POLICY:-}" || -z "${REWARD_MODEL:-}" || -z "${PROMPTS:-}" ]]; then
  echo "building the tiny default in $WORKDIR"
  "$PY" - "$WORKDIR" <<'PYEOF'
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from engine.tasks.arithmetic import make_rows, write_jsonl
from models.tiny import build_tiny_model

root = Path(sys.argv[1])
policy = build_tiny_model("llama", root / "policy", seed=0, hidden_size=128, intermediate_size=256,
                          num_attention_heads=4, num_key_value_heads=2)
torch.manual_seed(0)
rm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
rm.config.pad_token_id = 0
rm.save_pretrained(root / "rm")
AutoTokenizer.from_pretrained(policy).save_pretrained(root / "rm")
write_jsonl(make_rows(8, max_operand=9, seed=0), root / "prompts" / "train.jsonl")
PYEOF
  POLICY=$WORKDIR/policy REWARD_MODEL=$WORKDIR/rm PROMPTS=$WORKDIR/prompts INPUT_KEY=${INPUT_KEY:-prompt}
  ROLLOUT_BATCH_SIZE=${ROLLOUT_BATCH_SIZE:-8} BEST_OF_N=${BEST_OF_N:-2} GENERATE_MAX_LEN=${GENERATE_MAX_LEN:-8}
  TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-2} MICRO_TRAIN_BATCH_SIZE=${MICRO_TRAIN_BATCH_SIZE:-1}
  TRAIN_ARGS=${TRAIN_ARGS:---max_len 64 --max_steps 2 --learning_rate 1e-4} GEN_ARGS=${GEN_ARGS:---enforce_eager}
fi

ITERS=${ITERS:-1} INPUT_KEY=${INPUT_KEY:-input} BEST_OF_N=${BEST_OF_N:-4}
ROLLOUT_BATCH_SIZE=${ROLLOUT_BATCH_SIZE:-1024} GENERATE_MAX_LEN=${GENERATE_MAX_LEN:-1024}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-64} MICRO_TRAIN_BATCH_SIZE=${MICRO_TRAIN_BATCH_SIZE:-4}
GEN_ARGS=${GEN_ARGS:-} TRAIN_ARGS=${TRAIN_ARGS:-}

# generate_and_score ITER OUT_DIR POST_PROCESSOR OUTPUT_NAME: BEST_OF_N samples per prompt of the
# ITER-th prompt slice from POLICY (vLLM), scored by REWARD_MODEL, post-processed into OUT_DIR/OUTPUT_NAME.
generate_and_score() {
  local iter=$1 out=$2 post_processor=$3 output_name=$4
  mkdir -p "$out"
  "$PY" -m engine.cli.batch_inference --eval_task generate --pretrain "$POLICY" --dataset "$PROMPTS" \
    --input_key "$INPUT_KEY" --best_of_n "$BEST_OF_N" --generate_max_len "$GENERATE_MAX_LEN" \
    --temperature 1.0 --iter "$iter" --rollout_batch_size "$ROLLOUT_BATCH_SIZE" --seed "$iter" \
    --output_path "$out/generate.jsonl" $GEN_ARGS
  "$PY" -m engine.cli.batch_inference --eval_task rm --pretrain "$REWARD_MODEL" --dataset "$out/generate.jsonl" \
    --post_processor "$post_processor" --output_path "$out/$output_name"
}
