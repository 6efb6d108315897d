"""Perplexities, bits per byte, and bootstrap confidence intervals over documents (SPEC 4).

Nothing here raises on finished compute: a zero count gives null and an overflow inf, each with a
note, so that a cell's numbers are never lost to the arithmetic that summarises them."""

from __future__ import annotations

import math

import numpy as np

LN2 = math.log(2)


def _ppl(nll: float, count: int, unit: str, notes: list) -> float | None:
    if count <= 0:
        notes.append(f"{unit} perplexity is null: the stream has no {unit}s")
        return None
    try:
        return math.exp(nll / count)
    except OverflowError:
        notes.append(f"{unit} perplexity overflows a float (nll {nll:.4g} over {count} {unit}s): reported as inf")
        return math.inf


def summarize(nll: float, tokens: int, n_bytes: int, words: int) -> dict:
    notes: list[str] = []
    out = {
        "nll_sum": nll,
        "n_tokens": tokens,
        "n_bytes": n_bytes,
        "n_words": words,
        "token_ppl": _ppl(nll, tokens, "token", notes),
        "word_ppl": _ppl(nll, words, "word", notes),
        "bits_per_byte": nll / (LN2 * n_bytes) if n_bytes > 0 else None,
    }
    if n_bytes <= 0:
        notes.append("bits per byte is null: the stream has no bytes")
    if notes:
        out["notes"] = notes
    return out


def bootstrap_ci(
    doc_nll, doc_tokens, doc_bytes, doc_words, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """Percentile intervals for token ppl, word ppl and bits/byte, resampling whole documents. Each
    interval contains its point estimate (rounding could put a one-document interval a hair beside
    it); a metric whose point estimate is null or not finite gets no interval."""
    nll, tok, byt, wrd = (np.asarray(a, dtype=np.float64) for a in (doc_nll, doc_tokens, doc_bytes, doc_words))
    point = summarize(float(nll.sum()), int(tok.sum()), int(byt.sum()), int(wrd.sum()))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(nll), size=(n_boot, len(nll)))
    s_nll, s_tok, s_byt, s_wrd = (a[idx].sum(1) for a in (nll, tok, byt, wrd))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        samples = {
            "token_ppl": np.exp(s_nll / s_tok),
            "word_ppl": np.exp(s_nll / s_wrd),
            "bits_per_byte": s_nll / (LN2 * s_byt),
        }
    for name, values in samples.items():
        p = point[name]
        if p is None or not math.isfinite(p) or not np.isfinite(values).all():
            out[name] = None
            continue
        out[name] = [min(float(np.percentile(values, lo)), p), max(float(np.percentile(values, hi)), p)]
    return out


def paired_delta(doc_nll, ref_nll, doc_tokens, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict | None:
    """Token-perplexity difference of a cell to a reference cell on the same documents, with a paired
    bootstrap interval (SPEC 7): each resample draws documents once and scores both cells on them, so
    what the documents share (their difficulty) cancels. None when either perplexity is not finite."""
    a, b, t = (np.asarray(x, dtype=np.float64) for x in (doc_nll, ref_nll, doc_tokens))
    if len(a) != len(b) or len(a) != len(t) or not len(a) or t.sum() <= 0:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        pa, pb = np.exp(a.sum() / t.sum()), np.exp(b.sum() / t.sum())
        if not (np.isfinite(pa) and np.isfinite(pb)):
            return None
        idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
        n = t[idx].sum(1)
        deltas = np.exp(a[idx].sum(1) / n) - np.exp(b[idx].sum(1) / n)
    point = float(pa - pb)
    lo, hi = np.percentile(deltas, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    lo, hi = min(float(lo), point), max(float(hi), point)
    return {
        "delta_ppl": point,
        "delta_pct": float(100 * (pa / pb - 1)),
        "ci95": [lo, hi],
        "excludes_zero": lo > 0 or hi < 0,
    }
