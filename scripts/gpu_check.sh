#!/usr/bin/env bash
# The first-GPU-run check on a cluster node with the full install (tools/gpu_check.py): one PASS /
# FAIL / SKIP line per GPU path. Installs the GPU extras into $VENV (default .venv-gpu) if missing.
# The lent single-GPU machine without vLLM / Ray runs scripts/device_check.sh instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
if ! "$VENV/bin/python" -c "import vllm, megatron.core, torch" 2>/dev/null; then
  VENV="$VENV" bash scripts/install_gpu.sh
fi
# The driver / CUDA build pairing first: a CUDA 13 torch on a pre-r580 driver sees no GPU, and
# that is what this says (with CUDA forward compatibility as the way out), not "no CUDA device".
"$VENV/bin/python" -m tools.cuda_preflight
# A kernel counts only if it imports (ring-flash-attn installs without flash-attn; a Transformer
# Engine built for another CUDA raises OSError at import): the local spec / torch kernels then run.
"$VENV/bin/python" -c "
from parallel.optional_deps import probe_all
for name, found in probe_all().items():
    print(f'{name:18s}', found.status)"
exec "$VENV/bin/python" -m tools.gpu_check "$@"
