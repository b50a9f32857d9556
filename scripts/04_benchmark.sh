#!/usr/bin/env bash
# Stage benchmark: distill benchmark --config $CONFIG [key=value ...] [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/distill benchmark --config "${CONFIG:-configs/smollm2_support.yaml}" "$@"
