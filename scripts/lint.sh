#!/usr/bin/env bash
# Style (ruff) and the layering contract (import-linter, .importlinter). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache
