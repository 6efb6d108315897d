"""Memory per document of full and low-rank (LoRA) dynamic evaluation, side by side, on a randomly
initialised Llama of about 1B parameters built in code (LlamaConfig, no download).

    flock /tmp/tta_cpu.lock .venv/bin/python benchmarks/lora_memory.py               # CPU, float32
    .venv/bin/python benchmarks/lora_memory.py --device cuda --segment 128           # a GPU when one is lent
    .venv/bin/python benchmarks/lora_memory.py --settings lora-sgd lora-rms          # a subset

Each setting runs in a fresh process (one setting's freed memory cannot serve the next) and reports:
- adapted state: what the method holds per document besides the shared model: full, the copy W0 of
  every weight it adapts; LoRA, A and B and their reset values (B = 0, A's init);
- optimizer statistics: the rms rule's sqrt(ms) + eps, one value per adapted element (and sqrt(ms)
  itself with decay > 0). They are filled with ones here (same bytes; this measures memory, not
  gains), so no prepare pass is needed;
- activation peak: the peak growth of memory while one document of two segments runs (the first
  scored and adapted on, the second scored with it as context and adapted on), over the memory just
  before it (model and state allocated): the kept scoring graph, the gradients, the backward's and
  the update's transients. CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs); CUDA: max
  allocated. Per lane, everything but the shared model is per document.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# About 1.1B parameters (TinyLlama-1.1B's shape): 22 blocks, d 2048, feed-forward 5632, 4 KV heads.
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
)
SETTINGS = {
    "full-sgd": {"variant": "sgd", "lr": 1e-3},
    "full-rms": {"variant": "rms", "lr": 3e-5},
    "lora-sgd": {"variant": "sgd", "lr": 1e-3, "params": "lora"},
    "lora-rms": {"variant": "rms", "lr": 3e-5, "params": "lora"},
}
GIB = 2**30


def _status(field: str) -> int:
    """A /proc/self/status line in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def build_lm(device: str, dtype: str, layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tta_bench.protocol.flops import Ledger
    from tta_bench.protocol.lm import LM, ByteTokenizer

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    config = LlamaConfig(**{**LLAMA_1B, "num_hidden_layers": layers}, torch_dtype=dt)
    model = LlamaForCausalLM(config).to(device, dt)
    for p in model.parameters():
        p.requires_grad_(False)
    # no FLOP counting: tracing a 1B model is slow and is no part of what is measured here
    return LM(
        model,
        ByteTokenizer(),
        "llama-1b-random",
        "random",
        2048,
        torch.device(device),
        dt,
        ledger=Ledger(enabled=False),
    )


def measure(name: str, device: str, dtype: str, segment: int, layers: int) -> dict:
    """One setting in this process: the three memory terms, in bytes."""
    import torch

    from tta_bench.api.method import method_class
    from tta_bench.api.registry import discover
    from tta_bench.protocol.evaluate import Protocol, evaluate
    from tta_bench.protocol.stream import Stream, TokenizedDoc
    from tta_bench.run.cellrun import retain_freed_memory

    t0 = time.perf_counter()
    lm = build_lm(device, dtype, layers)
    discover()
    cls = method_class("dynamic-eval")
    params, errs = cls.make_params(SETTINGS[name])
    assert not errs, errs
    protocol = Protocol(segment, segment, "document")
    method = cls(lm, params, protocol=protocol)
    dyn = method.dyn
    if params.variant == "rms":
        dyn.use_stats([torch.ones_like(p) for p in dyn.params])  # the statistics' bytes, not their values

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts or [])

    state = nbytes(dyn.originals) + (nbytes(dyn.params) if method.adapter is not None else 0)
    stats = nbytes(dyn.denom) + nbytes(dyn.rms)
    ids = torch.randint(0, LLAMA_1B["vocab_size"], (2 * segment,), generator=torch.Generator().manual_seed(0))
    stream = Stream("random", "test", [TokenizedDoc("doc", ids.tolist(), 0, 0)])
    if device == "cpu":
        retain_freed_memory()
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS
    else:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t1 = time.perf_counter()
    evaluate(method, stream, protocol, progress=False)
    peak = _status("VmHWM") if device == "cpu" else torch.cuda.max_memory_allocated()
    method.close()
    return {
        "setting": name,
        "adapted_params": dyn.numel,
        "model_params": sum(p.numel() for p in lm.model.parameters()),
        "state_bytes": state,
        "stats_bytes": stats,
        "activation_peak_bytes": peak - before,
        "document_seconds": time.perf_counter() - t1,
        "seconds": time.perf_counter() - t0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--segment", type=int, default=64, help="segment length (the context is as long)")
    ap.add_argument("--layers", type=int, default=LLAMA_1B["num_hidden_layers"], help="blocks (fewer: a smoke run)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child process: measure this setting, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.device, args.dtype, args.segment, args.layers)))
        return 0
    rows = []
    for name in args.settings:
        cmd = [sys.executable, __file__, "--one", name, "--device", args.device, "--dtype", args.dtype]
        cmd += ["--segment", str(args.segment), "--layers", str(args.layers)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if out.returncode:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {name}: {rows[-1]['seconds']:.0f}s", file=sys.stderr)
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def print_table(rows: list[dict], args) -> None:
    model = rows[0]["model_params"]
    print(
        f"Llama, random init, {model / 1e9:.2f}B parameters, {args.dtype} on {args.device}; one document of"
        f" 2 segments of {args.segment} tokens (context {args.segment}); GiB per document"
    )
    head = f"{'setting':10} {'adapted params':>15} {'adapted state':>14} {'rms stats':>10} {'activation peak':>16} {'total':>8} {'s/doc':>7}"
    print(head)
    for r in rows:
        total = r["state_bytes"] + r["stats_bytes"] + r["activation_peak_bytes"]
        print(
            f"{r['setting']:10} {r['adapted_params']:>15,} {r['state_bytes'] / GIB:>14.3f} {r['stats_bytes'] / GIB:>10.3f}"
            f" {r['activation_peak_bytes'] / GIB:>16.3f} {total / GIB:>8.3f} {r['document_seconds']:>7.1f}"
        )


if __name__ == "__main__":
    sys.exit(main())
