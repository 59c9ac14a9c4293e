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
"$VENV/bin/python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
export MAX_JOBS=${MAX_JOBS:-8}
for spec in "transformer-engine[pytorch]>=2.9,<2.12" "flash-attn==2.8.3" "ring-flash-attn==0.1.8"; do
  if "$PIP" install --quiet --no-build-isolation "$spec"; then
    echo "installed $spec"
  else
    echo "WARN: $spec did not install (needs nvcc / the CUDA toolkit matching torch.version.cuda); its path stays off"
  fi
done
echo "installed into $VENV"
