#!/usr/bin/env bash
# The scheduled job: run every stage (each skips itself when its inputs and config are unchanged; generate
# answers only new prompts, train retrains only past train.retrain_min_change), then promote through the gate.
#   CONFIG=configs/smollm2_support.yaml bash scripts/nightly.sh [key=value ...]
# Exit codes for schedulers: 0 promoted (or nothing changed), 2 bad input, 3 promotion refused by the gate,
# 75 another run holds the run directory (retry later). DISTILL_LOG_FORMAT=json gives JSON log lines.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${CONFIG:-configs/smollm2_support.yaml}"
.venv/bin/distill status --config "$CONFIG" "$@" >&2  # the job log says what this run redoes, and why
.venv/bin/distill run --config "$CONFIG" "$@"
.venv/bin/distill promote --config "$CONFIG" "$@"
