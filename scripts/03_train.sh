#!/usr/bin/env bash
# Stage train: distill train --config $CONFIG [key=value ...] [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/distill train --config "${CONFIG:-configs/smollm2_support.yaml}" "$@"
