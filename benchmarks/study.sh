#!/usr/bin/env bash
# The full study from a clean checkout: bench-study.yaml on the first CUDA device when there is one,
# else bench-study-cpu.yaml (what 2 CPU cores compute in one session: one seed, the trained methods
# left to the pilot); BENCH=file picks another. Extra arguments go to `run`. With --publish, the cells
# go to results/study and its leaderboard, README table and report are written from them.
# Usage: bash benchmarks/study.sh [--publish] [run arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
publish=0
if [ "${1:-}" = "--publish" ]; then publish=1; shift; fi
if nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null; then
  bench=${BENCH:-bench-study.yaml}
else
  bench=${BENCH:-bench-study-cpu.yaml}
  echo "no GPU: $bench on the CPU"
fi
start=$(date +%s)
"$python" -m tta_bench run "$bench" --no-progress "$@"
echo "study: $(( $(date +%s) - start )) s wall-clock, prepare and tuning included"
if [ "$publish" = 1 ]; then
  rm -rf results/study && mkdir -p results/study && cp -r runs/study/cells results/study/
  "$python" -m tta_bench leaderboard results/study --readme README.md
  "$python" -m tta_bench report results/study
fi
