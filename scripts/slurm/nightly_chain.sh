#!/usr/bin/env bash
# The nightly chain on Slurm, each step after the previous one succeeded:
#   sharded generation (array) -> merge -> filter -> train (accelerate, NODES x GPUS) -> benchmark -> promote
#   CONFIG=configs/qwen7b_to_qwen0.5b.yaml SHARDS=8 bash scripts/slurm/nightly_chain.sh
# Each step skips itself when nothing changed, so a night without new prompts finishes in minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CONFIG="${CONFIG:-configs/smollm2_support.yaml}"
SHARDS="${SHARDS:-4}"
D=".venv/bin/distill"
array=$(sbatch --parsable --array="0-$((SHARDS - 1))" scripts/slurm/generate_sharded.sbatch)
# generate_sharded.sbatch queues its own merge; this chain waits on the array and merges explicitly too
# (an already merged run is skipped), so later steps have one job id to depend on.
merge=$(sbatch --parsable --dependency="afterok:$array" --job-name=distill-merge --wrap "$D generate --config '$CONFIG' --merge-shards $SHARDS")
filter=$(sbatch --parsable --dependency="afterok:$merge" --job-name=distill-filter --wrap "$D filter --config '$CONFIG'")
# Training through accelerate on NODES nodes x GPUS GPUs each (ACCELERATE_CONFIG: DDP, FSDP or ZeRO-3).
train=$(sbatch --parsable --dependency="afterok:$filter" --nodes="${NODES:-1}" --gres="gpu:${GPUS:-1}" \
  --export="ALL,GPUS_PER_NODE=${GPUS:-1}" scripts/slurm/train_multigpu.sbatch)
bench=$(sbatch --parsable --dependency="afterok:$train" --gres=gpu:1 --job-name=distill-benchmark --wrap "$D benchmark --config '$CONFIG'")
promote=$(sbatch --parsable --dependency="afterok:$bench" --job-name=distill-promote --wrap "$D promote --config '$CONFIG'")
echo "queued: generate $array, merge $merge, filter $filter, train $train, benchmark $bench, promote $promote"
