"""Perplexities, bits per byte, and confidence intervals over documents (SPEC 4).

Every interval is a t-interval on per-document contributions to a ratio of sums (NLL over tokens,
over bytes, over words), the way a token-weighted mean is estimated: the standard error is the
leverage-corrected sandwich (HC2) one, and the degrees of freedom are Satterthwaite's for documents
whose spread grows with their length, (sum t^2)^2 / sum t^4 - 1 (at least 1). A percentile or BCa bootstrap over
8 documents covers 85-90% where this covers at least 92% (tests/test_intervals.py measures it), and
the same t statistic gives the p-value that Holm's correction adjusts.

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


def linear_interval(point: float, resid, weights, level: float = 0.95) -> dict:
    """Interval and two-sided p-value (against 0) for a statistic whose per-document linearisation is
    resid / sum(weights) (resid sums to 0; weights: each document's denominator, its length). `ci`
    is None where one document leaves no spread to estimate; `zero_width`
    marks a deterministic quantity (every residual 0), which gets no p-value."""
    from scipy import stats

    r, w = np.asarray(resid, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    out = {"point": float(point), "ci": None, "se": None, "df": None, "p": None, "zero_width": False}
    total = w.sum()
    if len(r) < 2 or total <= 0 or not np.isfinite(r).all() or not math.isfinite(point):
        return out
    h = w / total  # each document's leverage in the ratio
    se = float(np.sqrt(np.sum(r**2 / (1 - h))) / total)
    # at least 1: one document far longer than the rest leaves about one degree of freedom
    df = max(1.0, float(np.sum(w**2) ** 2 / np.sum(w**4) - 1))
    out.update(se=se, df=df)
    if se <= 1e-12 * max(abs(point), 1e-300):  # both cells differ by the same constant everywhere
        out.update(ci=[float(point), float(point)], zero_width=True)
        return out
    q = float(stats.t.ppf((1 + level) / 2, df))
    out["ci"] = [float(point - q * se), float(point + q * se)]
    out["p"] = float(2 * stats.t.sf(abs(point) / se, df))
    return out


def ratio_interval(num, den, level: float = 0.95) -> dict:
    """sum(num) / sum(den) over documents, with linear_interval's interval and p-value."""
    a, w = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    point = a.sum() / w.sum() if len(w) and w.sum() > 0 else math.nan
    return linear_interval(point, a - point * w, w, level)


def document_ci(doc_nll, doc_tokens, doc_bytes, doc_words, level: float = 0.95) -> dict:
    """Intervals over documents for token ppl, word ppl (exp of an interval on NLL per unit) and
    bits per byte; None for a metric with no finite point or no spread to estimate (one document)."""
    nll = np.asarray(doc_nll, dtype=np.float64)
    out = {}
    for name, den, scale in (
        ("token_ppl", doc_tokens, None),
        ("word_ppl", doc_words, None),
        ("bits_per_byte", doc_bytes, LN2),
    ):
        den = np.asarray(den, dtype=np.float64)
        if not len(den) or den.sum() <= 0:
            out[name] = None
            continue
        ci = ratio_interval(nll, den, level)["ci"]
        if ci is not None:
            with np.errstate(over="ignore"):
                ci = [float(x / scale) for x in ci] if scale else [float(v) for v in np.exp(ci)]
        out[name] = ci if ci is not None and all(map(math.isfinite, ci)) else None
    return out


def paired_difference(doc_nll, ref_nll, doc_tokens, doc_bytes=None, level: float = 0.95) -> dict | None:
    """A cell against a reference cell on the same documents (SPEC 4 "Comparisons"): the difference
    in NLL per token (nats, token-weighted: sum of per-document differences over all tokens, the
    primary one, whose p-value marks significance), in bits per byte, and in token perplexity, each
    with its paired interval. Pairing cancels what the documents share (their difficulty). None
    when the cells do not pair or a perplexity is not finite."""
    a, b, t = (np.asarray(x, dtype=np.float64) for x in (doc_nll, ref_nll, doc_tokens))
    if len(a) != len(b) or len(a) != len(t) or not len(a) or t.sum() <= 0:
        return None
    with np.errstate(over="ignore"):
        ra, rb = a.sum() / t.sum(), b.sum() / t.sum()
        pa, pb = np.exp(ra), np.exp(rb)
    if not (np.isfinite(pa) and np.isfinite(pb)):
        return None
    nll = ratio_interval(a - b, t, level)
    ppl = linear_interval(pa - pb, pa * (a - ra * t) - pb * (b - rb * t), t, level)
    out = {
        "delta_nll": nll["point"],
        "nll_ci95": nll["ci"],
        "p": nll["p"],
        "zero_width": nll["zero_width"],
        "delta_ppl": float(pa - pb),
        "delta_pct": float(100 * (pa / pb - 1)),
        "ci95": ppl["ci"] if not nll["zero_width"] else [float(pa - pb)] * 2,
        "delta_bpb": None,
        "bpb_ci95": None,
    }
    ci = out["nll_ci95"]  # unadjusted; a table's marks are Holm's (leaderboard.py)
    out["excludes_zero"] = bool(ci and not out["zero_width"] and (ci[0] > 0 or ci[1] < 0))
    if doc_bytes is not None and np.sum(doc_bytes) > 0:
        bpb = ratio_interval((a - b) / LN2, doc_bytes, level)
        out.update(delta_bpb=bpb["point"], bpb_ci95=bpb["ci"])
    return out


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None: not tested, left out of the family)."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        out[i] = running
    return out
