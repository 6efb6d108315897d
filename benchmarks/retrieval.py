"""kNN-LM, continuous cache and kNN-LM + cache against none, side by side in one run.

smollm2-135m on the first --tokens tokens of WikiText-2 test; the kNN datastore is built from all of
WikiText-2 valid (the prepare split) with the same protocol, once, and cached on disk. Prints token
perplexity, eval time and FLOPs of each method relative to none (none runs first and last; the
ratios use the mean of its two times), the datastore size and build time, and the worst
normalisation error (|logsumexp| of the full distribution) at sampled positions.

    flock /tmp/tta_cpu.lock .venv/bin/python benchmarks/retrieval.py > /tmp/retrieval_bench.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--datastore-tokens", type=int, default=None, help="cap on valid tokens (default: all)")
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--context", type=int, default=1)
    # Defaults: the settings with the lowest perplexity on held-out WikiText-2 valid documents (the last
    # ~20k tokens, searched against a datastore of the rest of valid), never on test.
    ap.add_argument(
        "--knn",
        default='{"k": 1024, "lam": 0.25, "temperature": 3.0, "index": "ivfpq", "nlist": 1024,'
        ' "code_size": 64, "nprobe": 32, "rerank": 1}',
        help="kNN-LM params as JSON",
    )
    ap.add_argument("--cache", default='{"window": 2000, "theta": 0.01, "lam": 0.1}', help="cache params as JSON")
    ap.add_argument("--methods", default="knn-lm,cache,knn-cache")
    ap.add_argument("--build-only", action="store_true", help="build (or find) the datastore and stop")
    args = ap.parse_args()

    from tta_bench.run.cells import StreamCache, build_cell
    from tta_bench.run.config import expand, validate
    from tta_bench.protocol.models import load_model
    from tta_bench.run.cellrun import prepare_summary, run_cell
    from tta_bench.results.provenance import device_name

    knn, cache = json.loads(args.knn), json.loads(args.cache)
    if args.datastore_tokens:
        knn["datastore_tokens"] = args.datastore_tokens
    both = {**knn, "window": cache["window"], "theta": cache["theta"], "cache_lam": cache["lam"]}
    params = {"knn-lm": knn, "cache": cache, "knn-cache": both}
    names = [m for m in args.methods.split(",") if m]
    raw = {
        "device": "cpu",
        "progress": False,
        "limits": {"tokens": args.tokens},
        "protocol": {"segment_len": args.segment, "context_len": args.context, "reset": "document"},
        "models": [args.model],
        "tasks": [{"name": "wikitext-2", "split": "test", "prepare_split": "valid"}],
        "methods": ["none"] + [{"name": m, **params[m]} for m in names],
    }
    cfg, problems = validate(raw)
    if problems:
        raise SystemExit("\n".join(problems))
    lm = load_model(args.model, device="cpu")
    streams = StreamCache()

    # The datastore the kNN cells will use: prepared (or found) here so its build time is reported apart.
    cells = expand(cfg, "cpu")
    knn_cell = next((c for c in cells if c.method["name"] in ("knn-lm", "knn-cache")), None)
    if knn_cell is not None:
        built = build_cell(knn_cell, lm, streams, load_stream=False)
        info = built.method.knn.info
        built.close()
        print(
            f"datastore: {info['n_keys']:,} keys x {info['dim']} from WikiText-2 valid, {info['index']} index;"
            f" {prepare_summary(built.data.events, built.prepare_seconds)}",
            flush=True,
        )
    if args.build_only:
        return

    cells = cells + [cells[0]]  # none again at the end: the time ratio uses both runs
    rows, worst = [], {}
    for cell in cells:
        errs = []

        def observer(seg, lp, targets, errs=errs):
            rows_idx = torch.arange(seg.n)[::61]  # sampled positions
            errs.append(torch.logsumexp(lp[rows_idx].double(), -1).abs().max().item())

        t0 = time.perf_counter()
        rec = run_cell(cell, lm, streams, progress=False, observer=observer).to_json()
        worst[cell.label] = max(worst.get(cell.label, 0.0), max(errs))
        rows.append((cell.label, rec))
        c = rec["costs"]
        print(
            f"  ran {cell.label}: ppl {rec['metrics']['token_ppl']:.3f}, eval {c['eval_seconds']:.1f} s,"
            f" prepare {c['prepare_seconds']:.1f} s, wall {time.perf_counter() - t0:.0f} s",
            flush=True,
        )

    nones = [r for label, r in rows if label == "none"]
    t_none = sum(r["costs"]["eval_seconds"] for r in nones) / len(nones)
    f_none = nones[0]["costs"]["gflops_per_token"]
    ppl_none = nones[0]["metrics"]["token_ppl"]
    print(
        f"\n{args.model}, WikiText-2 test first {args.tokens:,} tokens, segment {args.segment}, context {args.context},"
        f" {device_name(lm.device)}"
    )
    times = ", ".join(f"{r['costs']['eval_seconds']:.1f} s" for r in nones)
    print(f"none eval times: {times}")
    print(
        f"{'method':<70} {'token ppl':>9} {'vs none':>8} {'time x none':>11} {'GFLOPs/tok':>10} {'FLOPs x none':>12} {'max|lse|':>9}"
    )
    for label, r in rows[:-1]:
        c, m = r["costs"], r["metrics"]
        print(
            f"{label[:70]:<70} {m['token_ppl']:>9.3f} {m['token_ppl'] - ppl_none:>+8.3f} {c['eval_seconds'] / t_none:>11.3f}"
            f" {c['gflops_per_token']:>10.4f} {c['gflops_per_token'] / f_none:>12.4f} {worst[label]:>9.1e}"
        )


if __name__ == "__main__":
    main()
