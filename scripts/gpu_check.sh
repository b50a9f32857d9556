#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, in about 8 minutes, with or without vLLM (then the transformers engine).
#
#   bash scripts/gpu_check.sh                     # Qwen2.5-0.5B / 1.5B from the hub
#   M05=/tmp/models/m05 M15=/tmp/models/m15 bash scripts/gpu_check.sh   # local folders (e.g. random-weight stand-ins)
#
# Liger kernels are the stage's GPU default for packed runs where liger-kernel is installed (scripts/setup.sh
# installs it on a GPU node); on a machine without a registry, carry its wheel (pure Python, ~1 MB: `pip download
# --no-deps liger-kernel`), or the checks below run the stage without it.
#
# 1. the tests marked `cuda` and the train/KD tests (not integration), on the GPU;
# 2. scripts/bench_train.py on a 0.5B- and a 1.5B-shaped student: ours / plain PyTorch+PEFT loop, unpacked and
#    packed, with model FLOPs utilisation against the device's datasheet peak;
# 3. the whole pipeline (configs/gpu_check.yaml: transformers engine, QLoRA student; vLLM and `vllm serve` where
#    vLLM is installed) end to end, its benchmark on the detected GPU profile with each system's decode roofline
#    share and its single-request latency, warm (timed first) and cold: the same work on this engine, so two
#    figures far apart mean a cost paid once per new shape (cuDNN attention's plans made warm 2.86 s against cold
#    0.84 s on an H200 before 9bf5caf);
# 4. what the stage's options do, each against the plain loop, beside the default bench it changes: on the 1.5B
#    shape unpacked, with Liger kernels (train.use_liger_kernel: by default on only when packing, as unpacked steps
#    are bound by launching kernels); on the 0.5B shape packed, with TRL's fused LM head (train.fused_lm_head, which
#    the size rule leaves off for these shapes on a large GPU: two syncs a step), two collating workers
#    (train.dataloader_workers) and torch.compile; unpacked, with TRL's per-step token metrics
#    (train.token_metrics) and with gradient checkpointing.
# Then one summary table, the floors met or missed, and whether the rules of the Liger and fused-head defaults
# held against their options measured here. Logs and JSON figures go to $OUT_DIR (default gpu_check_out/). Each
# step has its own time limit and a failed step does not stop the others; the exit status is non-zero if any failed.
# Steps run in the order of the summary, the checks first, the option costs last. By default the workers step
# (1.13x the plain loop on two days), torch.compile, token metrics and checkpointing are left out
# (SKIP="workers compile token_metrics checkpointing"). Each bench takes three turns (plain, ours, three times) and
# reports the medians: the plain loop's own speed moved up to 44% between turns seconds apart on one H200. The rest
# took 402 s on an H200 with the setup (2026-11-27: tests 100 s, benches 64 and 66, pipeline 51, the two option
# benches 38 and 46) with 8 unpacked timed steps a turn; unpacked turns now time 18 (~0.2 s a step on either
# shape, so ~12 s more a bench), as 8-step windows of 1.3-2.3 s gave ratios of 0.75-1.13 for one bench.
# Compiling the whole 0.4B model ran ~150 s without finishing its first step; the stage now compiles each decoder
# layer in place, one compilation for all (SmolLM2-135M on a 2-core CPU: 17 + 21 s for the first two unpacked steps
# against 123 + 165 s whole), not yet timed on a GPU: `SKIP=` runs its bench.
# SKIP= (empty) runs every step; SKIP="..." leaves out the steps it names.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
M05=${M05:-Qwen/Qwen2.5-0.5B-Instruct}
M15=${M15:-Qwen/Qwen2.5-1.5B-Instruct}
OUT_DIR=${OUT_DIR:-gpu_check_out}
PYTEST_ARGS=${PYTEST_ARGS:-}   # e.g. "-p tok_plugin" on a machine without the bundled model's package
mkdir -p "$OUT_DIR"
export WANDB_MODE=${WANDB_MODE:-disabled} PYTHONUNBUFFERED=1
declare -A status seconds
steps=() benches=()  # names in the order they ran (or were skipped): the summary's rows

SKIP=${SKIP-workers compile token_metrics checkpointing}
skipped() { steps+=("$1"); status[$1]="skipped ($2)"; seconds[$1]=0; }  # skipped NAME WHY: a row, not run
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT_DIR/NAME.log, record status and time
  local name=$1 limit=$2; shift 2
  if [[ " $SKIP " == *" $name "* ]]; then skipped "$name" SKIP; return; fi
  steps+=("$name")
  local started=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  seconds[$name]=$((SECONDS - started))
  if [ $rc -eq 0 ]; then status[$name]=ok; elif [ $rc -eq 124 ]; then status[$name]="timed out"; else status[$name]="failed ($rc)"; fi
  echo "   ${status[$name]} in ${seconds[$name]} s"; grep -E "passed|failed|ratio|utilisation|memory|Error" "$OUT_DIR/$name.log" | tail -12
}

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), 'torch', torch.__version__)" || exit 2

# 240 s: 100 s on an H200 on 2026-11-27, since then the compile test and five more trainings of tiny students.
step tests 240 $PY -m pytest -q $PYTEST_ARGS -m "not integration" tests/test_train.py tests/test_kd.py
bench() {  # bench NAME [OPTIONS...] -- [OVERRIDES...]: options before the config overrides (argparse)
  local name=$1; shift; local options=(); while [ "$1" != -- ]; do options+=("$1"); shift; done; shift
  benches+=("$name")
  step "$name" 150 $PY scripts/bench_train.py --steps 20 --packed-steps 7 --warmup 2 --rounds 3 "${options[@]}" \
    --json "$OUT_DIR/$name.json" train.per_device_train_batch_size=16 train.max_length=1024 "$@"
}
bench bench_05b --profile -- "student.model=$M05"
bench bench_15b -- "student.model=$M15"
# Where vLLM is installed, the pipeline runs on the engines users run on a GPU node: vLLM's offline engine for
# generation and the benchmark, `vllm serve` for its load test, in one process after training (the train stage's
# memory must be handed back first). Eager mode: CUDA graph capture would cost each of the five engine starts more
# than it saves on this little work. Not yet run on a GPU: the lent machines have no vLLM.
engines=() pipeline_limit=240
if $PY -c "import vllm" 2>/dev/null; then
  vllm_engine="{backend: vllm, dtype: bfloat16, max_model_len: 2048, gpu_memory_utilization: 0.6, enforce_eager: true}"
  engines=("teacher.engine=$vllm_engine" "benchmark.engine=$vllm_engine"
           "benchmark.load_test={enabled: true, concurrency: [1, 8], requests: 8, warmup: 2}")
  pipeline_limit=420
fi
step pipeline $pipeline_limit $PY -m pipeline.cli run --config configs/gpu_check.yaml --force "runs_dir=$OUT_DIR/runs" \
  "teacher.model=$M05" "student.model=$M05" ${engines[@]+"${engines[@]}"}
if $PY -c "import liger_kernel" 2>/dev/null; then
  bench liger_unpacked --only unpacked -- "student.model=$M15" train.use_liger_kernel=true
else
  skipped liger_unpacked "no liger-kernel: the default runs without it"; benches+=(liger_unpacked)
fi
bench fused_head --only packed -- "student.model=$M05" train.fused_lm_head=true
bench workers --only packed -- "student.model=$M05" train.dataloader_workers=2
bench compile --only packed -- "student.model=$M05" train.torch_compile=true
bench token_metrics --only unpacked -- "student.model=$M05" train.token_metrics=true
bench checkpointing --only unpacked -- "student.model=$M05" train.gradient_checkpointing=true

$PY scripts/gpu_check_summary.py "$OUT_DIR" "${benches[@]}"  # the table, floors, rules and pipeline figures
echo
failed=0
for name in "${steps[@]}"; do
  printf '%-14s %-14s %4s s\n' "$name" "${status[$name]}" "${seconds[$name]}"
  case "${status[$name]}" in ok|skipped*) ;; *) failed=1 ;; esac
done
exit $failed
