#!/usr/bin/env bash
# Stage filter: distill filter --config $CONFIG [key=value ...] [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/distill filter --config "${CONFIG:-configs/smollm2_support.yaml}" "$@"
