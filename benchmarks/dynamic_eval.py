"""Dynamic evaluation against `none`, side by side in one process on one loaded model: token
perplexity, time x none and FLOPs x none for each context length (the issue's acceptance runs).

    flock /tmp/tta_cpu.lock .venv/bin/python benchmarks/dynamic_eval.py                  # the acceptance set
    flock /tmp/tta_cpu.lock .venv/bin/python benchmarks/dynamic_eval.py --tokens 3000 --context 1 \\
        --method variant=sgd,lr=1e-3 --method variant=rms,lr=3e-5

Each --method is a comma-separated list of dynamic-eval parameters. The default protocol is Krause et
al.'s (reset never: one stream). Timing per SPEC 5: perf_counter on CPU (CUDA events on GPU) after a
warm-up segment, `none` measured in the same run: "time x none" is the leaderboard's ratio (total
seconds per token), "median" the ratio of median seconds per full segment, which a burst of load from
other processes on a shared machine barely moves.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tta_bench.run.cells import StreamCache, build_cell  # noqa: E402
from tta_bench.run.config import expand, validate  # noqa: E402
from tta_bench.protocol.models import load_model  # noqa: E402
from tta_bench.run.cellrun import evaluate_cell, make_record  # noqa: E402

# rms: the best on WikiText-2 valid (statistics from its first 100 segments, scored on the 10,000 tokens
# after them) of lr 3e-6, 1e-5, 3e-5 with eps 1e-5 (3e-5 diverged), 1e-5 with eps 1e-4, 1e-5, 3e-5 with eps 1e-3.
DEFAULT_METHODS = ["variant=sgd,lr=1e-3", "variant=rms,lr=3e-5,eps=1e-3"]


def parse_method(text: str) -> dict:
    out = {"name": "dynamic-eval"}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a string such as sgd or "last 2"
        out[key.strip()] = value
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=20000, help="first N tokens of WikiText-2 test")
    ap.add_argument("--segment", type=int, default=128)
    ap.add_argument("--context", type=int, nargs="+", default=[1, 384])
    ap.add_argument("--reset", default="never", choices=["document", "never"])
    ap.add_argument("--method", action="append", help="dynamic-eval parameters, e.g. variant=sgd,lr=1e-3")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    methods = [parse_method(m) for m in (args.method or DEFAULT_METHODS)]

    lm = load_model(args.model, device=args.device)
    streams = StreamCache()
    rows = []
    for ctx in args.context:
        raw = {
            "device": args.device,
            "progress": False,
            "models": [args.model],
            "protocol": {"segment_len": args.segment, "context_len": ctx, "reset": args.reset},
            "limits": {"tokens": args.tokens},
            "tasks": [{"name": "wikitext-2", "split": "test"}],
            "methods": ["none", *methods],
        }
        cfg, problems = validate(raw, "benchmarks/dynamic_eval.py")
        if problems:
            raise SystemExit("; ".join(problems))
        base = None
        for cell in expand(cfg, args.device):
            built = build_cell(cell, lm, streams)  # the record, and the per-segment times it sums
            result = evaluate_cell(built)
            rec = make_record(built, result).to_json()
            c, m = rec["costs"], rec["metrics"]
            full = [t for t, n in zip(result.seconds[1:], result.seg_tokens[1:]) if n == args.segment]
            row = {
                "context_len": ctx,
                "reset": args.reset,
                "method": rec["label"],
                "token_ppl": m["token_ppl"],
                "gflops_per_token": c["gflops_per_token"],
                "flops": c["flops_per_token"],
                "sec_per_token": 1 / c["tokens_per_second"],
                "median_segment_s": statistics.median(full),
                "prepare_s": c["prepare_seconds"],
                "device": c["device"],
            }
            if base is None:
                base = row
            row["ppl_change_pct"] = 100 * (row["token_ppl"] / base["token_ppl"] - 1)
            row["time_x_none"] = row["sec_per_token"] / base["sec_per_token"]
            row["median_time_x_none"] = row["median_segment_s"] / base["median_segment_s"]
            row["flops_x_none"] = row["gflops_per_token"] / base["gflops_per_token"]
            rows.append(row)
            print(
                f"ctx {ctx:4d} reset {args.reset:<8} {row['method']:<44} ppl {row['token_ppl']:8.3f} ({row['ppl_change_pct']:+6.1f}%)"
                f"  time x none {row['time_x_none']:5.2f} (median {row['median_time_x_none']:4.2f})"
                f"  FLOPs x none {row['flops_x_none']:5.2f}  {row['gflops_per_token']:.3f} GFLOPs/tok"
                f"  prepare {row['prepare_s']:.1f}s  [{row['device']}]",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(math.isfinite(r["token_ppl"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
