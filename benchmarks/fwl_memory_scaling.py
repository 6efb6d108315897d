"""Peak memory and time of FWL's document memories as documents grow (issue 15).

The block alone, at smollm2-135m's sizes (d 576, m 256, vocabulary 49152), streamed over one
document of 1k, 4k and 16k tokens in segments of 128 with its state carried (fast_state document):
chunk-recurrent (recurrent, chunk 128) and decayed (timescales 128 and 4096), each design and length in
a fresh process so that its peak RSS is its own. The base model's cost per segment does not depend on
the document's length, so the block is what could grow.

    python benchmarks/fwl_memory_scaling.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch

LENGTHS = (1024, 4096, 16384)
SEGMENT = 128


DESIGNS = {"recurrent": {"recurrent": True}, "decayed": {"timescales": (128.0, 4096.0)}}


def one(design: str, n_tokens: int) -> dict:
    from tta_bench_methods.fwl.block import FWBlock, FWLConfig, FWStream

    torch.manual_seed(0)
    block = FWBlock(FWLConfig(576, 256, 49152, 1 / 512, **DESIGNS[design])).eval()
    stream = FWStream(block, chunk=SEGMENT)
    x, base = torch.randn(1, SEGMENT, 576), torch.randn(1, SEGMENT, 49152)
    ids = torch.randint(0, 49152, (1, SEGMENT + 1))
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(0, n_tokens, SEGMENT):
            stream.segment_logits(x, base, ids[:, : SEGMENT - 1])
            stream.commit(ids[:, SEGMENT - 1 : SEGMENT])
    seconds = time.perf_counter() - t0
    state_mb = sum(t.numel() * t.element_size() for t in stream.state) / 2**20
    return {
        "design": design,
        "tokens": n_tokens,
        "ms_per_token": 1000 * seconds / n_tokens,
        "state_mb": state_mb,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": start,
    }


def main():
    for design in DESIGNS:
        rows = []
        for n in LENGTHS:
            out = subprocess.run([sys.executable, __file__, design, str(n)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{design}:\n{'tokens':>7} {'ms/token':>9} {'state MB':>9} {'peak RSS MB':>12}")
        for r in rows:
            print(f"{r['tokens']:>7} {r['ms_per_token']:>9.3f} {r['state_mb']:>9.2f} {r['peak_rss_mb']:>12.0f}")
        first, last = rows[0], rows[-1]
        print(
            f"16k vs 1k tokens: peak RSS x{last['peak_rss_mb'] / first['peak_rss_mb']:.3f},"
            f" time per token x{last['ms_per_token'] / first['ms_per_token']:.3f}, state x{last['state_mb'] / first['state_mb']:.1f}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 2:
        print(json.dumps(one(sys.argv[1], int(sys.argv[2]))))
    else:
        main()
