"""FWL's gate (`gate: bayes`) replayed from a run's per-token logs, for any `gate_share`.

The gate's output at a token depends only on the two models' probabilities of the document's targets
(methods/fwl/gate.py: fixed_share), so the gated perplexity of a block cell and the run's `none` cell
follows exactly from their token logs, with no model. Where the run also has the gated cell, its
perplexity is printed beside the replay as a check. Every gate_share printed is on the evaluated text:
a sensitivity curve, not a way to choose the share.

    python benchmarks/gate_from_logs.py runs/fwl-memory "fwl (recurrent document)" --control fwl-static --shares 0 0.001
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from tta_bench.results import tokenlog
from tta_bench.protocol.metrics import paired_difference
from tta_bench.results.records import load_cells
from tta_bench_methods.fwl.gate import fixed_share


def gated_logprobs(block: np.ndarray, base: np.ndarray, offsets: np.ndarray, share: float) -> np.ndarray:
    """Each token's log p_mix(y) = log(w p_block(y) + (1 - w) p_base(y)), w from fixed_share per document."""
    out = np.empty_like(block, dtype=np.float64)
    for a, b in zip(offsets[:-1], offsets[1:]):
        odds = np.array(fixed_share(0.0, (block[a:b] - base[a:b]).tolist(), share)[:-1])
        log_w, log_not = -np.logaddexp(0, -odds), -np.logaddexp(0, odds)
        out[a:b] = np.logaddexp(log_w + block[a:b], log_not + base[a:b])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder (its cells/ hold token logs)")
    ap.add_argument("label", help="the block cell's label, e.g. 'fwl (recurrent document)'")
    ap.add_argument("--control", help="a second block cell (the control), replayed behind the same gate")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.001])
    args = ap.parse_args()
    cells: dict[str, dict[str, dict]] = {}
    for rec in load_cells(args.run):
        if rec.ok and not tokenlog.problem(args.run, rec):
            cells.setdefault(rec.config["task"].get("label") or rec.config["task"]["name"], {})[rec.label] = rec
    found = {task: by_label for task, by_label in cells.items() if args.label in by_label and "none" in by_label}
    if not found:
        raise SystemExit(
            f"no task in {args.run} has both a `none` cell and one labelled {args.label!r} with token logs"
            " (run the bench with log_tokens: true)"
        )
    for task, by_label in sorted(found.items()):
        names = [args.label, "none"] + ([args.control] if args.control in by_label else [])
        logs = {k: tokenlog.read(args.run, by_label[k]) for k in names}
        lp = {k: v["logprob"].astype(np.float64) for k, v in logs.items()}
        if not all(np.array_equal(v["targets"], logs["none"]["targets"]) for v in logs.values()):
            raise SystemExit(
                f"{task}: the cells of {', '.join(names)} scored different streams; replay cells of one run"
            )
        offsets = logs["none"]["doc_offsets"]
        doc_nll = lambda x: -np.add.reduceat(x, offsets[:-1])  # noqa: E731
        tokens = np.diff(offsets)
        ppl = lambda x: math.exp(-x.mean())  # noqa: E731

        def delta(a, b):
            d = paired_difference(doc_nll(a), doc_nll(b), tokens)
            return (
                f"{d['delta_ppl']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]{'*' if d['excludes_zero'] else ''}"
            )

        print(
            f"{task}: none {ppl(lp['none']):.3f}, {args.label} {ppl(lp[args.label]):.3f} ({len(offsets) - 1} documents, {offsets[-1]} tokens)"
        )
        if len(names) == 3:
            print(
                f"  ungated: {args.label} vs {args.control} ({ppl(lp[args.control]):.3f}) {delta(lp[args.label], lp[args.control])}"
            )
        for share in args.shares:
            gated = gated_logprobs(lp[args.label], lp["none"], offsets, share)
            cell = by_label.get(f"{args.label} + gate")
            same = cell and cell["resolved"]["method_params"].get("gate_share", 0.0) == share
            line = f"  gate_share {share:g}: {ppl(gated):.3f}, vs none {delta(gated, lp['none'])}"
            if len(names) == 3:
                line += f", vs {args.control} + gate {delta(gated, gated_logprobs(lp[args.control], lp['none'], offsets, share))}"
            print(line + (f"; the gated cell: {cell['metrics']['token_ppl']:.3f}" if same else ""))


if __name__ == "__main__":
    main()
