#!/usr/bin/env bash
# Install, then lint, build the docs strictly and run the test suite (tiny random models; a few integration
# tests load the bundled model).
# Two pytest workers with one thread each: most tests drive tiny models and are bound by Python, not by matmuls,
# so one process left a core idle 40% of the time (measured on 2 cores: 10.6 min against 15.7-17.2 serially).
# Arguments go to pytest after these: `-n 0` runs serially (for -s or a debugger), `-n 4` on a larger machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE="${WANDB_MODE:-offline}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/ruff check pipeline tests scripts
# The documentation site, its reference generated from the code: a broken link, anchor or page fails here.
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$site"
.venv/bin/python -m pytest -n 2 --dist loadgroup "$@"
