"""Lanes (protocol.lanes) side by side: per method and lane count, tokens/s, peak memory and the share
of the device's dense peak the evaluation reaches, all measured in one run.

The dense peak is a large matrix product timed in the same run (float32 on the CPU, bfloat16 on a
GPU), in FLOPs per second; a cell's achieved rate is its fvcore FLOPs per scored token x 2 (fvcore
counts a multiply-add as one) x its tokens/s, padding left out. Every cell scores the same documents
(WikiText-2 test, drawn among those long enough, each cut to --doc-tokens), so only the lane count
differs between the rows of a method; its NLL must not move (printed as the largest relative change).

    flock /tmp/tta_cpu.lock .venv/bin/python benchmarks/lanes.py                       # CPU: smollm2-135m
    .venv/bin/python benchmarks/lanes.py --device cuda --dtype bfloat16 --lanes 1 4 16 32
    .venv/bin/python benchmarks/lanes.py --model llama-1b-random --methods none --lanes 1 2 4   # memory per lane

`llama-1b-random` is a randomly initialised Llama of about 1.1B parameters built in code (no download),
reading bytes as tokens. Methods that do not run in lanes (dynamic evaluation, ttt) run with one lane
whatever is asked; the table says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_METHODS = ["none", "cache", "knn-lm", "fwl", "finetune", "dynamic-eval"]
QUICK_TRAINING = {"train_tokens": 4096, "val_tokens": 512, "train_steps": 8, "eval_every": 4}
METHOD_PARAMS = {"knn-lm": {"datastore_tokens": 8192}, "fwl": {"fast_state": "document", **QUICK_TRAINING}}
METHOD_PARAMS["finetune"] = QUICK_TRAINING


def dense_peak(device, dtype, n: int, reps: int) -> float:
    """FLOPs per second of an n x n matrix product (2 n^3 per product), best of `reps`."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def random_llama(device, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.lora_memory import LLAMA_1B
    from tta_bench.protocol.lm import LM, ByteTokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B, torch_dtype=dtype)).to(device, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return LM(model, ByteTokenizer(), "llama-1b-random", "llama-1b-random-seed0", 2048, device, dtype)


def bench_cells(args, lanes: int) -> list:
    from tta_bench.run.config import expand, load
    import yaml

    bench = {
        "run": "lanes",
        "output_dir": tempfile.mkdtemp(),
        "device": args.device,
        "dtype": args.dtype,
        "protocol": {"segment_len": args.segment, "context_len": 1, "reset": "document", "lanes": lanes},
        "limits": {
            "docs": args.docs,
            "draw": "random",
            "min_doc_tokens": args.doc_tokens,
            "doc_tokens": args.doc_tokens,
        },
        "models": ["tiny" if args.model == "llama-1b-random" else args.model],
        "tasks": [{"name": "wikitext-2", "split": "test", "prepare_split": "valid"}],
        "methods": [{"name": m, **METHOD_PARAMS.get(m, {})} for m in args.methods],
    }
    path = Path(bench["output_dir"]) / "bench.yaml"
    path.write_text(yaml.safe_dump(bench))
    return expand(load(str(path)), args.device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a registered model, or llama-1b-random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--lanes", nargs="+", type=int, default=[1, 4, 16, 32])
    ap.add_argument("--docs", type=int, default=32, help="documents scored (at least the largest lane count)")
    ap.add_argument("--doc-tokens", type=int, default=256)
    ap.add_argument("--segment", type=int, default=128)
    ap.add_argument("--matmul", type=int, default=0, help="size of the dense-peak product (0: 2048 CPU, 8192 GPU)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()

    import torch

    from tta_bench.protocol.models import load_model
    from tta_bench.run.cellrun import StreamCache, run_cell

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    peak = dense_peak(device, dtype, args.matmul or (8192 if device.type == "cuda" else 2048), reps=5)
    print(f"dense peak ({args.dtype} matmul on {args.device}): {peak / 1e12:.3f} TFLOP/s")
    if args.model == "llama-1b-random":
        lm = random_llama(device, dtype)
    else:
        lm = load_model(args.model, device=args.device, dtype=args.dtype)
    streams, rows = StreamCache(), []
    for lanes in args.lanes:
        for cell in bench_cells(args, lanes):
            rec = run_cell(cell, lm, streams, progress=False)
            if not rec.ok:
                print(f"{cell.label} at {lanes} lanes: failed: {rec.reason}", file=sys.stderr)
                return 1
            c = rec.costs
            achieved = c["gflops_per_token"] * 1e9 * 2 * (c["tokens_per_second"] or 0)
            rows.append(
                {
                    "method": cell.label,
                    "lanes_asked": lanes,
                    "lanes": c.get("lanes", 1),
                    "tokens_per_second": c["tokens_per_second"],
                    "peak_memory_bytes": c["peak_memory_bytes"],
                    "peak_memory_kind": c["peak_memory_kind"],
                    "share_of_dense_peak": achieved / peak,
                    "padding_flops": sum(v for k, v in c["flops"].items() if k.startswith("forward.padding.")),
                    "nll_sum": rec.metrics["nll_sum"],
                }
            )
            r = rows[-1]
            print(
                f"{r['method']:<14} lanes {lanes:>3} (ran {r['lanes']:>3})  {r['tokens_per_second']:9.1f} tok/s"
                f"  peak {r['peak_memory_bytes'] / 2**20:8.0f} MiB  {100 * r['share_of_dense_peak']:5.1f}% of dense peak",
                flush=True,
            )
    print("\nper method, against its own 1-lane row (same documents):")
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        base = mine[0]
        for r in mine[1:]:
            drift = abs(r["nll_sum"] - base["nll_sum"]) / abs(base["nll_sum"])
            print(
                f"{m:<14} {r['lanes_asked']:>3} lanes: tokens/s x {r['tokens_per_second'] / base['tokens_per_second']:.2f},"
                f" peak memory x {r['peak_memory_bytes'] / base['peak_memory_bytes']:.2f}, NLL moved {drift:.1e}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"dense_peak_flops": peak, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
