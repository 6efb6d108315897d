"""Documents of a cell shared out by torchrun against one process: per-document NLL must be
bit-identical (same thread count on both sides), and the shared-out cell's wall time is the slowest
rank's. Default: smollm2-135m on the first 4 documents of WikiText-2 test, none and dynamic-eval.

    python benchmarks/sharded.py [--model smollm2-135m] [--docs 4] [--ranks 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--segment", type=int, default=512)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, launcher in (
            ("one process", [sys.executable, "-m", "tta_bench"]),
            (
                f"torchrun x{args.ranks}",
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc_per_node={args.ranks}",
                    "-m",
                    "tta_bench",
                ],
            ),
        ):
            bench = Path(tmp) / f"{len(out)}.yaml"
            bench.write_text(
                yaml.safe_dump(
                    {
                        "run": f"r{len(out)}",
                        "output_dir": str(Path(tmp) / "results"),
                        "device": "cpu",
                        "progress": False,
                        "protocol": {"segment_len": args.segment, "context_len": 1, "reset": "document"},
                        "limits": {"docs": args.docs},
                        "models": [args.model],
                        "tasks": [{"name": "wikitext-2", "split": "test"}],
                        "methods": ["none", "dynamic-eval"],
                    }
                )
            )
            proc = subprocess.run(
                [*launcher, "run", str(bench), "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True
            )
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            cells = [
                json.loads(p.read_text()) for p in (Path(tmp) / "results" / f"r{len(out)}" / "cells").glob("*.json")
            ]
            out[name] = {c["label"]: c for c in cells}
    (a, one), (b, many) = out.items()
    print(f"{args.model}, WikiText-2 test, first {args.docs} documents, segment {args.segment}, OMP_NUM_THREADS=1")
    for label, rec in sorted(one.items()):
        x, y = [d["nll"] for d in rec["per_doc"]], [d["nll"] for d in many[label]["per_doc"]]
        print(
            f"  {label}: {len(x)} documents, {rec['metrics']['n_tokens']} tokens; per-document NLL bit-identical: {x == y}"
            f" (largest difference {max(abs(u - v) for u, v in zip(x, y)):.3g}); wall {a} {rec['costs']['eval_seconds']:.1f} s,"
            f" {b} {many[label]['costs']['eval_seconds']:.1f} s (slowest rank)"
        )


if __name__ == "__main__":
    main()
