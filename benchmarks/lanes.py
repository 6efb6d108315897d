"""Lanes (protocol.lanes) side by side: per method and lane count, tokens/s, peak memory and the share
of the device's dense peak the evaluation reaches, all measured in one run.

The dense peak is a large matrix product timed in the same run (float32 on the CPU, bfloat16 on a
GPU), in FLOPs per second; a cell's achieved rate is its fvcore FLOPs per scored token x 2 (fvcore
counts a multiply-add as one) x its tokens/s, padding left out. Every cell scores the same documents
(WikiText-2 test, drawn among those long enough, each cut to --doc-tokens), so only the lane count
differs between the rows of a method; its NLL must not move (printed as the largest relative change).

On the CPU each cell runs in a process of its own, one at a time, so its peak memory (the peak resident
set of that process, the model included) is its own; on a GPU the cells share one process and the
peak is torch's peak allocation during the cell (reset before it).
The memory a lane adds is (peak at N lanes - peak at 1 lane) / (N - 1). A setting that does not fit
(out of memory) is reported as such, and larger lane counts of it are not tried.

    flock /tmp/tta_cpu.lock .venv/bin/python benchmarks/lanes.py --lanes 1 4 8              # CPU: smollm2-135m
    .venv/bin/python benchmarks/lanes.py --device cuda --dtype bfloat16 --lanes 1 4 16 32
    .venv/bin/python benchmarks/lanes.py --model llama-1b-random --methods none dynamic-eval-lora \
        --lanes 1 2 4 --docs 4 --doc-tokens 128                                          # memory per lane

`llama-1b-random` is a randomly initialised Llama of about 1.1B parameters built in code (no download),
reading bytes as tokens. Settings are method names or the presets in SETTINGS.
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
QUICK_TRAINING = {"train_tokens": 4096, "val_tokens": 512, "train_steps": 8, "eval_every": 4}
# bench entries by setting name: a method with the parameters its row runs
SETTINGS = {
    "none": {"name": "none"},
    "cache": {"name": "cache", "window": 2000},
    "knn-lm": {"name": "knn-lm", "datastore_tokens": 8192},
    "fwl": {"name": "fwl", "fast_state": "document", **QUICK_TRAINING},
    "finetune": {"name": "finetune", **QUICK_TRAINING},
    "dynamic-eval": {"name": "dynamic-eval", "variant": "sgd"},
    "dynamic-eval-lora": {"name": "dynamic-eval", "variant": "sgd", "params": "lora", "label": "dynamic-eval-lora"},
    "ttt-nn": {"name": "ttt-nn", "k": 2, "datastore_tokens": 8192},
}
DEFAULT_SETTINGS = ["none", "cache", "knn-lm", "fwl", "finetune", "dynamic-eval", "dynamic-eval-lora", "ttt-nn"]


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


def bench_cells(args, setting: str, lanes: int) -> list:
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
        "methods": [SETTINGS[setting]],
    }
    path = Path(bench["output_dir"]) / "bench.yaml"
    path.write_text(yaml.safe_dump(bench))
    return expand(load(str(path)), args.device)


def load_lm(args):
    import torch

    from tta_bench.protocol.models import load_model

    if args.model == "llama-1b-random":
        return random_llama(torch.device(args.device), getattr(torch, args.dtype))
    return load_model(args.model, args.device, args.dtype)


def run_one(args, setting: str, lanes: int, lm) -> dict:
    """One cell on `lm` in this process; its row."""
    import torch

    from tta_bench.run.cellrun import StreamCache, run_cell

    (cell,) = bench_cells(args, setting, lanes)
    try:
        rec = run_cell(cell, lm, StreamCache(), progress=False)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"setting": setting, "lanes_asked": lanes, "failed": "out of memory"}
    if not rec.ok:
        return {"setting": setting, "lanes_asked": lanes, "failed": rec.reason}
    c = rec.costs
    return {
        "setting": setting,
        "lanes_asked": lanes,
        "lanes": c.get("lanes", 1),
        "tokens_per_second": c["tokens_per_second"],
        "achieved_flops": c["gflops_per_token"] * 1e9 * 2 * (c["tokens_per_second"] or 0),
        "peak_memory_bytes": c["peak_memory_bytes"],
        "peak_memory_kind": c["peak_memory_kind"],
        "padding_flops": sum(v for k, v in c["flops"].items() if k.startswith("forward.padding.")),
        "nll_sum": rec.metrics["nll_sum"],
    }


def cell_in_a_process(args, setting: str, lanes: int) -> dict:
    import subprocess

    cmd = [sys.executable, __file__, "--cell", setting, str(lanes), "--model", args.model, "--device", args.device]
    cmd += ["--dtype", args.dtype, "--docs", str(args.docs), "--doc-tokens", str(args.doc_tokens)]
    cmd += ["--segment", str(args.segment)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode != 0 or not lines:  # killed (out of memory on the CPU) or broken
        tail = (done.stderr.strip().splitlines() or ["killed"])[-1]
        why = "out of memory (killed)" if done.returncode in (-9, 137) else tail
        return {"setting": setting, "lanes_asked": lanes, "failed": why}
    return json.loads(lines[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a registered model, or llama-1b-random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_SETTINGS, choices=sorted(SETTINGS), help="settings")
    ap.add_argument("--lanes", nargs="+", type=int, default=[1, 4, 16, 32])
    ap.add_argument("--docs", type=int, default=32, help="documents scored (at least the largest lane count)")
    ap.add_argument("--doc-tokens", type=int, default=256)
    ap.add_argument("--segment", type=int, default=128)
    ap.add_argument("--matmul", type=int, default=0, help="size of the dense-peak product (0: 2048 CPU, 8192 GPU)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each cell in a process of its own (default: on the CPU, whose peak is a process's)",
    )
    ap.add_argument("--cell", nargs=2, metavar=("SETTING", "LANES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        print(json.dumps(run_one(args, args.cell[0], int(args.cell[1]), load_lm(args))), flush=True)
        return 0
    isolate = args.device == "cpu" if args.isolate is None else args.isolate

    import torch

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    peak = dense_peak(device, dtype, args.matmul or (8192 if device.type == "cuda" else 2048), reps=5)
    print(f"dense peak ({args.dtype} matmul on {args.device}): {peak / 1e12:.3f} TFLOP/s", flush=True)
    rows, lm = [], None if isolate else load_lm(args)
    for setting in args.methods:
        for lanes in args.lanes:
            r = cell_in_a_process(args, setting, lanes) if isolate else run_one(args, setting, lanes, lm)
            if "failed" not in r:
                r["share_of_dense_peak"] = r["achieved_flops"] / peak
            rows.append(r)
            if args.json:  # after every row: a sweep stopped at its time limit keeps what it measured
                Path(args.json).write_text(json.dumps({"dense_peak_flops": peak, "rows": rows}, indent=1))
            if "failed" in r:
                print(f"{setting:<18} lanes {lanes:>3}: {r['failed']}; larger lane counts not tried", flush=True)
                break
            print(
                f"{setting:<18} lanes {lanes:>3} (ran {r['lanes']:>3})  {r['tokens_per_second']:9.1f} tok/s"
                f"  peak {r['peak_memory_bytes'] / 2**20:8.0f} MiB  {100 * r['share_of_dense_peak']:5.1f}% of dense peak",
                flush=True,
            )
    print("\nper setting, against its own 1-lane row (same documents):")
    for m in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == m and "failed" not in r]
        if not mine or mine[0]["lanes_asked"] != 1:
            continue
        base = mine[0]
        for r in mine[1:]:
            drift = abs(r["nll_sum"] - base["nll_sum"]) / abs(base["nll_sum"])
            per_lane = (r["peak_memory_bytes"] - base["peak_memory_bytes"]) / (r["lanes_asked"] - 1)
            print(
                f"{m:<18} {r['lanes_asked']:>3} lanes: tokens/s x {r['tokens_per_second'] / base['tokens_per_second']:.2f},"
                f" peak memory x {r['peak_memory_bytes'] / base['peak_memory_bytes']:.2f}"
                f" ({per_lane / 2**20:+.0f} MiB per added lane), NLL moved {drift:.1e}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
