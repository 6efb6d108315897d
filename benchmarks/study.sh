#!/usr/bin/env bash
# The full study (bench-study.yaml) from a clean checkout, on the first CUDA device when there is one,
# else on the CPU; extra arguments go to `run` (on 2 CPU cores: --set 'seeds=[0]'). With --publish,
# the cells go to results/study and its leaderboard and report are written there.
# Usage: bash benchmarks/study.sh [--publish] [run arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
publish=0
if [ "${1:-}" = "--publish" ]; then publish=1; shift; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU: the study runs on the CPU"
start=$(date +%s)
"$python" -m tta_bench run bench-study.yaml --no-progress "$@"
echo "study: $(( $(date +%s) - start )) s wall-clock, prepare and tuning included"
if [ "$publish" = 1 ]; then
  rm -rf results/study && mkdir -p results/study && cp -r runs/study/cells results/study/
  "$python" -m tta_bench leaderboard results/study
  "$python" -m tta_bench report results/study
fi
