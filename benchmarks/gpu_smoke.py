"""GPU path check: every method that imports here runs on CUDA through the harness and agrees with
CPU on the tiny model (nll_sum within 1e-3 relative: TF32/kernel differences, adaptation compounds
them), with CUDA-event timing and CUDA peak memory in the record.

    python benchmarks/gpu_smoke.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

SAMPLE = [
    "The quick brown fox jumps over the lazy dog. " * 8,
    "Numbers 12345 and words repeat, repeat, repeat.\n" * 5,
    "A third document with some more text in it so that it spans several segments. " * 4,
]


def main() -> int:
    from tta_bench.run.config import expand, validate
    from tta_bench.api.errors import TTABenchError
    from tta_bench.api.method import method_class
    from tta_bench.protocol.models import load_model
    from tta_bench.api.registry import describe
    from tta_bench.run.cells import StreamCache
    from tta_bench.run.cellrun import run_cell

    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    tmp = Path(tempfile.mkdtemp())
    for split, texts in (("test", SAMPLE), ("train", [t[::-1] for t in SAMPLE] * 4)):
        (tmp / split).mkdir()
        for i, t in enumerate(texts):
            (tmp / split / f"d{i}.txt").write_text(t)
    failures, rows = 0, []
    lms = {dev: load_model("tiny", device=dev) for dev in ("cpu", "cuda")}
    for name, _ in describe("method"):
        try:
            cls = method_class(name)
        except Exception as e:  # e.g. faiss missing on this machine
            print(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
            continue
        records = {}
        for dev, lm in lms.items():
            cfg, problems = validate(
                {
                    "models": ["tiny"],
                    "device": dev,
                    "progress": False,
                    "tasks": [
                        {
                            "name": "text",
                            "split": "test",
                            "splits": {"test": str(tmp / "test"), "train": str(tmp / "train")},
                        }
                    ],
                    "methods": [{"name": name, **cls.quick_params}],
                    "protocol": {"segment_len": 32, "context_len": 32},
                }
            )
            assert not problems, problems
            try:
                records[dev] = run_cell(expand(cfg, dev)[0], lm, StreamCache(), progress=False).to_json()
            except TTABenchError as e:  # a dependency missing on this machine (faiss): say so, go on
                print(f"{name}: skipped on {dev} ({e})")
                break
        if len(records) < 2:
            continue
        c, g = records["cpu"], records["cuda"]
        rel = abs(c["metrics"]["nll_sum"] - g["metrics"]["nll_sum"]) / c["metrics"]["nll_sum"]
        ok = (
            rel < 1e-3
            and g["costs"]["timer"] == "cuda_events"
            and g["costs"]["peak_memory_kind"] == "cuda_max_allocated"
        )
        failures += not ok
        rows.append(
            {
                "method": name,
                "cpu_nll": c["metrics"]["nll_sum"],
                "cuda_nll": g["metrics"]["nll_sum"],
                "rel": rel,
                "cuda_tok_s": g["costs"]["tokens_per_second"],
                "cuda_peak_mb": g["costs"]["peak_memory_bytes"] / 2**20,
                "gflops_tok_cpu": c["costs"]["gflops_per_token"],
                "gflops_tok_cuda": g["costs"]["gflops_per_token"],
                "device": g["costs"]["device"],
                "ok": ok,
            }
        )
        print(json.dumps(rows[-1]))
    print(f"{len(rows)} methods, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
