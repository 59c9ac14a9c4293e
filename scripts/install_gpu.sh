#!/usr/bin/env bash
# GPU install, in order: vLLM's pinned CUDA torch and the plain wheels first, then the CUDA
# extensions compiled against that torch (--no-build-isolation: an isolated build would compile
# against a different torch, or none). The extensions are optional: without Transformer Engine
# the local layer spec runs, without flash-attn PyTorch SDPA; a failed build is reported, not fatal.
#   VENV=.venv-gpu bash scripts/install_gpu.sh      # default VENV: .venv-gpu
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
PIP="$VENV/bin/pip"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$PIP" install --quiet --upgrade pip setuptools wheel ninja packaging
"$PIP" install --quiet "torch==2.13.0" -e ".[gpu,test]"
# Stops here when torch cannot use the GPU, naming the cause (a pre-r580 driver for these CUDA 13
# wheels, and CUDA forward compatibility as the way out), before the extensions are built.
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
"$VENV/bin/python" -m tools.cuda_preflight
export MAX_JOBS=${MAX_JOBS:-8}
for entry in "transformer_engine=transformer-engine[pytorch]>=2.9,<2.12" "flash_attn=flash-attn==2.8.3" \
             "ring_flash_attn=ring-flash-attn==0.1.8"; do
  name=${entry%%=*}; spec=${entry#*=}
  if "$PIP" install --quiet --no-build-isolation "$spec"; then
    # Installed is not enough: it counts only if it imports (parallel/optional_deps.py).
    "$VENV/bin/python" -c "from parallel.optional_deps import probe; print('$spec:', probe('$name').status)"
  else
    echo "WARN: $spec did not install (needs nvcc / the CUDA toolkit matching torch.version.cuda); its path stays off"
  fi
done
echo "installed into $VENV"
