#!/usr/bin/env bash
# Stage generate: distill generate --config $CONFIG [key=value ...] [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/distill generate --config "${CONFIG:-configs/smollm2_support.yaml}" "$@"
