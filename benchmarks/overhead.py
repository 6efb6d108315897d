"""Harness overhead: `none` through the harness vs a bare transformers loop on the same windows.

Both score the same segments of WikiText-2 test with smollm2-135m (segment_len 512, context_len 1),
compute logits only for the scored positions (logits_to_keep), exclude their first segment as
warm-up, and alternate in one process so drift hits both. Prints the ratio of tokens/s
(harness / bare); the target is at least 0.97.

    python benchmarks/overhead.py [--tokens 8192] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def bare_loop(model, windows) -> float:
    """tokens/s of a plain loop: forward, log-softmax, gather, sum; first window excluded."""
    seconds, tokens, total = [], [], torch.zeros((), dtype=torch.float64)
    for ids, targets in windows:
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = model(input_ids=ids, logits_to_keep=len(targets)).logits[0]
            total -= torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]).double().sum()
        seconds.append(time.perf_counter() - t0)
        tokens.append(len(targets))
    return sum(tokens[1:]) / sum(seconds[1:])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from tta_bench.protocol.stream import tokenize
    from tta_bench.protocol.evaluate import Protocol, evaluate, segments
    from tta_bench.api.method import method_class
    from tta_bench.protocol.models import load_model
    from tta_bench.api.registry import get

    lm = load_model("smollm2-135m", device="cpu")
    stream = tokenize(
        get("task", "wikitext-2")().documents("test"), lm.tokenizer, "wikitext-2", "test", limit_tokens=args.tokens
    )
    protocol = Protocol(512, 1, "document")
    windows = [(seg.ids, targets) for seg, targets, _ in segments(stream, protocol, lm.start_id)]
    none = method_class("none")

    harness, bare = [], []
    for r in range(args.rounds):
        res = evaluate(none(lm, none.Params()), stream, protocol, progress=False)
        harness.append(sum(res.seg_tokens[1:]) / sum(res.seconds[1:]))
        bare.append(bare_loop(lm.model, windows))
        print(f"round {r}: harness {harness[-1]:.1f} tok/s, bare loop {bare[-1]:.1f} tok/s")
    ratio = statistics.median(harness) / statistics.median(bare)
    print(f"device: CPU, {torch.get_num_threads()} threads; {stream.n_tokens} tokens in {len(windows)} windows")
    print(f"harness / bare tokens/s = {ratio:.3f} (target >= 0.97)")
    return 0 if ratio >= 0.97 else 1


if __name__ == "__main__":
    sys.exit(main())
