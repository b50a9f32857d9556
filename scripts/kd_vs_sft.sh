#!/usr/bin/env bash
# Logit distillation against plain SFT on the same data: one teacher generation (with top-k logprobs), one
# filter, then two trainings and two benchmarks, put side by side by `distill compare`.
#   bash scripts/kd_vs_sft.sh                                       # the embedded default
#   CONFIG=configs/qwen7b_to_qwen0.5b.yaml bash scripts/kd_vs_sft.sh train.kd_alpha=0.8
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${CONFIG:-configs/smollm2_support.yaml}"
NAME="${NAME:-kd-vs-sft}"
D=.venv/bin/distill
# Replay rows have no teacher logprobs, so KD refuses them: both runs leave replay out, to train on the same rows.
shared=(teacher.sampling.logprobs="${LOGPROBS:-5}" train.replay.fraction=0 "$@")
$D run --config "$CONFIG" run_name="$NAME-kd" train.objective=kd "${shared[@]}"
RUNS=$(.venv/bin/python -c "from pipeline.config import load_config; import sys; print(load_config(sys.argv[1], sys.argv[2:]).run_dir.parent)" "$CONFIG" "${shared[@]}")
# The SFT run reuses the KD run's teacher outputs and dataset: same prompts, same kept answers.
mkdir -p "$RUNS/$NAME-sft"
for stage in generate filter; do
  [ -e "$RUNS/$NAME-sft/$stage" ] || cp -r "$RUNS/$NAME-kd/$stage" "$RUNS/$NAME-sft/$stage"
done
$D run --config "$CONFIG" run_name="$NAME-sft" train.objective=sft "${shared[@]}"
$D compare "$RUNS/$NAME-sft" "$RUNS/$NAME-kd"
