#!/usr/bin/env bash
# Install, then run the test suite (tiny random models; a few integration tests load the bundled model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE="${WANDB_MODE:-offline}"
.venv/bin/ruff check pipeline tests scripts
.venv/bin/python -m pytest "$@"
