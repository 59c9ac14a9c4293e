#!/usr/bin/env bash
# Download the wheels scripts/device_check.sh carries to the lent GPU machine (no network there):
# what the training path needs beyond its preinstalled torch + transformers (tools/device_wheels.py
# lists them, pinned), for CPython 3.12 on manylinux x86_64, without dependencies, into an ignored
# folder. Reports the total size and fails over the 64 MiB a command may carry.
#   bash scripts/fetch_device_wheels.sh          # into .device_wheels/ (DEVICE_WHEELS=... to change)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEVICE_WHEELS:-.device_wheels}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$DEST"
mapfile -t REQUIREMENTS < <("$PYTHON" -m tools.device_wheels --list)
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
  --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any "${REQUIREMENTS[@]}"
echo "wheels for the GPU machine in $DEST:"
exec "$PYTHON" -m tools.device_wheels --report "$DEST"
