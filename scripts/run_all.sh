#!/usr/bin/env bash
# The whole pipeline, one line per stage. Each stage skips itself when its inputs and config are
# unchanged, so rerunning after a crash redoes only what is missing.
#   CONFIG=configs/qwen7b_to_qwen0.5b.yaml bash scripts/run_all.sh   # another experiment
#   bash scripts/run_all.sh train.learning_rate=5e-4                  # any key=value override
set -euo pipefail
cd "$(dirname "$0")/.."
export CONFIG="${CONFIG:-configs/smollm2_support.yaml}"
bash scripts/01_generate.sh "$@"   # teacher answers the training prompts (vLLM offline engine)
bash scripts/02_filter.sh "$@"     # keep clean, verified answers as chat JSONL; log every drop
bash scripts/03_train.sh "$@"      # LoRA SFT of the student (TRL + PEFT)
bash scripts/04_benchmark.sh "$@"  # teacher vs base vs tuned student: accuracy, latency, cost, forgetting
REPORT=$(.venv/bin/python -c "from pipeline.config import load_config; import sys; print(load_config(sys.argv[1], sys.argv[2:]).layout.report_md)" "$CONFIG" "$@")
echo "Report: $REPORT"
