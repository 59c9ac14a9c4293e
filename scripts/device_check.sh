#!/usr/bin/env bash
# The GPU check for the lent machine as it is: one H100 / H200, Python 3.12, torch 2.11 (CUDA 13)
# and transformers preinstalled, no network, no vLLM / Ray / Transformer Engine / flash-attn.
# Installs the carried wheels (scripts/fetch_device_wheels.sh puts them in .device_wheels/, an
# ignored folder: carry it) into a temporary target on PYTHONPATH, then runs tools/device_check.py:
# five checks, each in its own process group with its own timeout, under 8 minutes in all; one
# PASS / FAIL / SKIP line each, a JSON summary in $OUT/device_check.json when OUT is set, exit 1
# on any FAIL.
#   bash scripts/device_check.sh [--dry-run] [--only train_step,ring_attention]
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${DEVICE_WHEELS:-.device_wheels}
PYTHON=${PYTHON:-python3}
LIMIT_S=${DEVICE_CHECK_LIMIT_S:-480}  # the whole command, installation included
DRY_RUN=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY_RUN=1; done
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
TARGET=$(mktemp -d "${TMPDIR:-/tmp}/device_check_site.XXXXXX")
trap 'rm -rf "$TARGET"' EXIT
if [ "$DRY_RUN" = 1 ]; then
  echo "would install ${#wheels[@]} carried wheel(s) from $WHEELS into a temporary target: ${wheels[*]:-(none)}"
  echo "would run, under a ${LIMIT_S} s limit: PYTHONPATH=\$PWD:<target> $PYTHON -m tools.device_check $*"
elif [ "${#wheels[@]}" -gt 0 ]; then
  # A wheel is a zip archive: with pip, a --target install; without pip, the archive unpacked.
  if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$TARGET" "${wheels[@]}" \
      || echo "WARN: pip could not install the carried wheels; the checks that need them are SKIP"
  else
    "$PYTHON" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
      "$TARGET" "${wheels[@]}"
  fi
else
  echo "no carried wheels in $WHEELS (scripts/fetch_device_wheels.sh): checks needing megatron-core are SKIP"
fi
export PYTHONPATH="$PWD:$TARGET${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
timeout -k 10 "$LIMIT_S" "$PYTHON" -m tools.device_check "$@"
status=$?
[ "$status" = 124 ] && echo "FAIL device_check: over its ${LIMIT_S} s limit"
exit "$status"
