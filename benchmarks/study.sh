#!/usr/bin/env bash
# The GPU study (bench-gpu.yaml) from a clean checkout: prepares and evaluates every cell on the first
# CUDA device, then publishes the leaderboard under results/study-gpu with the device named in every
# row's table heading. Usage: bash benchmarks/gpu_study.sh [--publish]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$(date +%s)
"$python" -m tta_bench run bench-gpu.yaml --no-progress
echo "study-gpu: $(( $(date +%s) - start )) s wall-clock, prepare included"
if [ "${1:-}" = "--publish" ]; then
  rm -rf results/study-gpu && mkdir -p results/study-gpu && cp -r runs/study-gpu/cells results/study-gpu/
  "$python" -m tta_bench leaderboard results/study-gpu
fi
