#!/usr/bin/env bash
# The first-GPU-run check (tools/gpu_check.py): one PASS / FAIL / SKIP line per GPU path, under
# 10 minutes on one GPU. Installs the GPU extras into $VENV (default .venv-gpu) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
if ! "$VENV/bin/python" -c "import vllm, megatron.core, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  VENV="$VENV" bash scripts/install_gpu.sh
fi
"$VENV/bin/python" -c "
import importlib.util as u
for name in ('transformer_engine', 'flash_attn', 'ring_flash_attn'):
    print(f'{name:16s}', 'installed' if u.find_spec(name) else 'absent (its path stays off)')"
exec "$VENV/bin/python" -m tools.gpu_check "$@"
