#!/usr/bin/env bash
# Install, then run the embedded default end to end on this machine (CPU is fine: docs/measurements.md gives the measured time on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/run_all.sh "$@"
