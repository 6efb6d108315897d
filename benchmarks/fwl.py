"""FWL against none and dynamic evaluation: perplexity, wall-clock and fvcore FLOPs, side by side.

smollm2-135m on the first N tokens of WikiText-2 test (segment_len 128, context_len 1, reset=document);
the FWL block is trained on WikiText-2 valid (or loaded from the cache), dynamic evaluation is SGD over
all parameters (lr 1e-3). In one process:

1. each method through the harness (run_cell): token ppl, fvcore FLOPs per token (forward, plus the
   backward and update of dynamic evaluation) and the harness's own tokens/s;
2. wall-clock in lockstep: the same methods score (and adapt on) segment k one after another, in a
   rotating order, before any moves on to segment k+1, each timed with perf_counter; the time ratio is
   the median over segments of t_method / t_none. Other processes on a shared machine slow every
   method in the same stretch of time, so the ratios hold where whole-run times do not.

Prints each method's time and FLOPs as ratios to none, and FWL's FLOPs broken down into vocabulary
projections, dense layers and linear attention (inside a chunk, and the carried state).
Goal: FWL at most 1.6x none and at most half of dynamic evaluation, on time and on FLOPs.

    flock /tmp/tta_cpu.lock python benchmarks/fwl.py [--tokens 20000] [--timing-tokens 6000] [--fwl size=256 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch


def breakdown(block, chunk: int, n: int, fast_state: str) -> dict[str, float]:
    """fvcore flops per scored token of a full segment of n positions (context_len 1), by part: the
    carried-state pass and the commit of the last position (fast_state=document), or the window pass."""
    from fvcore.nn import FlopCountAnalysis

    from tta_bench_methods.fwl.block import commit_pass, score_pass

    x = torch.zeros(1, n, block.cfg.d_in)
    base = torch.zeros(1, n, block.cfg.vocab)
    state = tuple(block.zero_state(1, x))
    parts: dict[str, float] = {}
    passes = [(score_pass(block, chunk, False), (x, base, torch.zeros(1, n, dtype=torch.long)))]
    if fast_state == "document":
        passes = [
            (score_pass(block, chunk, True), (x, base, torch.zeros(1, n - 1, dtype=torch.long), *state)),
            (commit_pass(block), (x[:, :1], base[:, :1], torch.zeros(1, 1, dtype=torch.long), *state)),
        ]
    for module, inputs in passes:
        a = FlopCountAnalysis(module, inputs)
        a.unsupported_ops_warnings(False)
        a.uncalled_modules_warnings(False)
        a.tracer_warnings("none")
        by = a.by_module()
        for key, name in (
            ("block.op_vocab", "vocabulary projections (U z slow, U^T g, U z fast)"),
            ("block.op_dense", "dense layers (slow, W2 backward, fast)"),
            ("block.op_attn", "linear attention inside a chunk"),
            ("block.op_state", "linear-attention state updates"),
        ):
            parts[name] = parts.get(name, 0.0) + by.get(key, 0) / n
    return parts


def lockstep(cells, models, streams, n_tokens) -> dict[str, list[float]]:
    """Seconds per segment of each cell's method (score + adapt), the methods taking turns segment by segment."""
    from tta_bench.run.cells import build_cell
    from tta_bench.protocol.evaluate import segments
    from tta_bench.api.method import Segment

    built = {
        cell.method["name"]: build_cell(cell, models[cell.method["name"]], streams, load_stream=False) for cell in cells
    }
    for b in built.values():
        b.lm.ledger.enabled = False
    cell = cells[0]
    lm0 = models[cell.method["name"]]
    stream = streams.get(lm0, cell.task, cell.task["split"], {"docs": None, "tokens": n_tokens})
    names = list(built)
    times = {n: [] for n in names}
    try:
        for k, (seg, targets, doc_start) in enumerate(segments(stream, built[names[0]].protocol, lm0.start_id)):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                m = built[name].method
                if doc_start:
                    m.reset()
                s = Segment(seg.ids, seg.n, seg.doc, seg.start)
                t0 = time.perf_counter()
                m.score(s)
                s.targets = targets
                m.adapt(s)
                times[name].append(time.perf_counter() - t0)
    finally:
        for b in built.values():
            b.close()
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--timing-tokens", type=int, default=6000, help="tokens of the lockstep timing")
    ap.add_argument("--segment-len", type=int, default=128)
    ap.add_argument("--dyn-lr", type=float, default=1e-3)
    ap.add_argument("--fwl", nargs="*", default=[], metavar="KEY=VALUE", help="fwl parameters")
    ap.add_argument("--skip-dyneval", action="store_true")
    args = ap.parse_args()

    import yaml

    from tta_bench.run.cells import StreamCache
    from tta_bench.run.config import expand, validate
    from tta_bench.protocol.models import load_model
    from tta_bench.run.cellrun import run_cell
    from tta_bench_methods.fwl.block import FWBlock
    from tta_bench_methods.fwl.train import TrainConfig, load_checkpoint

    fwl_params = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.fwl)}
    methods = ["none", {"name": "fwl", **fwl_params}]
    if not args.skip_dyneval:
        methods.append({"name": "dynamic-eval", "variant": "sgd", "lr": args.dyn_lr, "params": "all"})
    raw = {
        "run": "bench-fwl",
        "output_dir": "/tmp/tta_bench_fwl",
        "device": "cpu",
        "progress": False,
        "protocol": {"segment_len": args.segment_len, "context_len": 1, "reset": "document"},
        "limits": {"tokens": args.tokens},
        "models": ["smollm2-135m"],
        "tasks": [{"name": "wikitext-2", "split": "test", "prepare_split": "valid"}],
        "methods": methods,
    }
    cfg, problems = validate(raw)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    cells = expand(cfg, "cpu")
    lm = load_model("smollm2-135m", device="cpu")
    streams = StreamCache()
    rec = {}
    for cell in cells:
        r = run_cell(cell, lm, streams, progress=False).to_json()
        rec[cell.method["name"]] = r
        m, c = r["metrics"], r["costs"]
        print(
            f"{cell.label}: token ppl {m['token_ppl']:.3f}, {c['tokens_per_second']:.0f} tok/s (whole run),"
            f" {c['gflops_per_token']:.4f} GFLOPs/token, prepare {c['prepare_seconds']:.0f}s",
            flush=True,
        )

    # dynamic evaluation writes into its model's weights: it gets a model of its own
    models = {name: lm for name in rec}
    if "dynamic-eval" in rec:
        models["dynamic-eval"] = load_model("smollm2-135m", device="cpu")
    times = lockstep(cells, models, streams, args.timing_tokens)
    n_seg = len(times["none"]) - 1  # the first segment is a warm-up
    ratio = {name: statistics.median(t[k] / times["none"][k] for k in range(1, len(t))) for name, t in times.items()}

    none = rec["none"]["costs"]
    print(
        f"\ndevice: {none['device']}, {torch.get_num_threads()} threads; ppl and FLOPs over"
        f" {rec['none']['stream']['n_tokens']} tokens; time: median per-segment ratio over {n_seg} lockstep segments"
        f" ({args.timing_tokens} tokens), segment_len {args.segment_len}, context_len 1"
    )
    print(f"{'method':<14}{'token ppl':>10}{'ms/segment':>12}{'time x none':>13}{'FLOPs x none':>14}")
    flops = {}
    for name, r in rec.items():
        flops[name] = r["costs"]["gflops_per_token"] / none["gflops_per_token"]
        ms = 1000 * statistics.median(times[name][1:])
        print(f"{name:<14}{r['metrics']['token_ppl']:>10.3f}{ms:>12.1f}{ratio[name]:>13.3f}{flops[name]:>14.3f}")

    fwl = rec["fwl"]
    p = fwl["resolved"]["method_params"]
    tc = TrainConfig(**{f.name: p[f.name] for f in dataclasses.fields(TrainConfig)})
    if tc.train_fast_state == "auto":
        tc.train_fast_state = p["fast_state"]
    block = FWBlock(tc.block_config(lm))  # flops do not depend on the trained weights
    parts = breakdown(block, p["chunk"], args.segment_len, p["fast_state"])
    base = none["gflops_per_token"] * 1e9
    print(
        f"\nFWL flops per token (fast_state={p['fast_state']}, full segment of {args.segment_len}, m={p['size']}, d={lm.hidden_size},"
        f" V={lm.vocab_size}), as a fraction of none's {base / 1e6:.1f} MFLOPs:"
    )
    print(f"  {'base body + head (as none)':<55}{base / 1e6:>9.2f} M  {1.0:>6.3f}")
    for name, v in parts.items():
        print(f"  {name:<55}{v / 1e6:>9.2f} M  {v / base:>6.3f}")
    ledger = sum(v for k, v in fwl["costs"]["flops_per_token"].items() if k.startswith("forward.fwl"))
    print(f"  (ledger over the stream, short last segments included: {ledger / 1e6:.2f} M/token of FWL block)")
    head = lm.vocab_size * lm.hidden_size
    print(
        f"  one vocabulary projection of the base head: {head / 1e6:.2f} M = {head / base:.3f} of none;"
        f" FWL's three of width m: {3 * lm.vocab_size * p['size'] / 1e6:.2f} M"
    )

    event = next((e for e in fwl["prepare"]["cache"] if e["kind"] == "fwl-block"), None)
    if event is not None:
        info = load_checkpoint(f"{event['folder']}/block.safetensors")[2]
        print(
            f"\nFWL block {event['folder']}: trained on {info['train_tokens']} tokens of {info['data'][1]} in"
            f" {info['train_seconds']:.0f}s ({info['hidden_seconds']:.0f}s of it base hidden states; ~0 when cached)"
            f" on {info['device']} with {info['threads']} threads; kept step {info['best_step']},"
            f" validation nll {info['val_nll']:.4f} (base {info['history'][-1]['val_nll_base']:.4f})"
        )

    ok = True
    t, f = ratio["fwl"], flops["fwl"]
    print(f"\nFWL / none: time {t:.3f}, FLOPs {f:.3f} (goal <= 1.6)")
    ok &= t <= 1.6 and f <= 1.6
    if "dynamic-eval" in ratio:
        td, fd = ratio["dynamic-eval"], flops["dynamic-eval"]
        print(f"FWL / dynamic eval: time {t / td:.3f}, FLOPs {f / fd:.3f} (goal <= 0.5)")
        ok &= t / td <= 0.5 and f / fd <= 0.5
    better = fwl["metrics"]["token_ppl"] < rec["none"]["metrics"]["token_ppl"]
    print(f"FWL beats none in token ppl: {better}")
    return 0 if ok and better else 1


if __name__ == "__main__":
    sys.exit(main())
