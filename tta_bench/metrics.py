"""Perplexities, bits per byte, and bootstrap confidence intervals over documents (SPEC 4)."""
from __future__ import annotations

import math

import numpy as np

LN2 = math.log(2)


def summarize(nll: float, tokens: int, n_bytes: int, words: int) -> dict:
    return {
        "nll_sum": nll,
        "n_tokens": tokens,
        "n_bytes": n_bytes,
        "n_words": words,
        "token_ppl": math.exp(nll / tokens),
        "word_ppl": math.exp(nll / words),
        "bits_per_byte": nll / (LN2 * n_bytes),
    }


def bootstrap_ci(doc_nll, doc_tokens, doc_bytes, doc_words, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile intervals for token ppl, word ppl and bits/byte, resampling whole documents."""
    nll, tok, byt, wrd = (np.asarray(a, dtype=np.float64) for a in (doc_nll, doc_tokens, doc_bytes, doc_words))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(nll), size=(n_boot, len(nll)))
    s_nll, s_tok, s_byt, s_wrd = (a[idx].sum(1) for a in (nll, tok, byt, wrd))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for name, values in (("token_ppl", np.exp(s_nll / s_tok)), ("word_ppl", np.exp(s_nll / s_wrd)),
                         ("bits_per_byte", s_nll / (LN2 * s_byt))):
        out[name] = [float(np.percentile(values, lo)), float(np.percentile(values, hi))]
    return out
