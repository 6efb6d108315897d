"""Intervals over documents (SPEC 4 "Comparisons"): their 95% coverage measured by simulation at the
study's document counts, the closed form they reduce to, and Holm's correction against its rule.

`pytest -s tests/test_intervals.py` prints the coverage numbers; `-m slow` runs 4,000 studies a setting."""

import math

import numpy as np
import pytest
from scipy import stats

from tta_bench.protocol.metrics import document_ci, holm, paired_difference

TRUE_GAIN, HARDNESS = -0.05, 3.0  # nats per token: the method's mean effect; the base model's mean NLL
# a nominal 95% interval must cover at least this often: 0.92 measured on 4,000 studies a setting
# (binomial sd 0.004), 0.90 on the fast test's 1,000 (sd 0.008: 0.92 would fail by chance)
BAND, FAST_BAND = 0.92, 0.90


def _study(rng, n: int, effect: str, spread: float):
    """One simulated study: n documents of lengths spread over 1,000 .. 1,000 * spread tokens, each
    with its own difficulty and its own per-token effect (normal, or skewed: most documents gain
    little, a few much), plus token-level noise; the effect's population mean is TRUE_GAIN."""
    t = np.round(np.exp(rng.uniform(np.log(1000), np.log(1000 * spread), n)))
    hard = HARDNESS + rng.normal(0, 0.5, n)
    if effect == "normal":
        e = TRUE_GAIN + rng.normal(0, 0.05, n)
    else:
        e = TRUE_GAIN - (rng.exponential(0.05, n) - 0.05)
    ref = hard * t + rng.normal(0, 1, n) * np.sqrt(t)
    return ref + e * t + rng.normal(0, 1, n) * np.sqrt(t), ref, t


def _coverage(n: int, effect: str, spread: float, studies: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    true_ppl = math.exp(HARDNESS + TRUE_GAIN) - math.exp(HARDNESS)
    hits = {"delta_nll": 0, "delta_bpb": 0, "delta_ppl": 0, "token_ppl": 0}
    for _ in range(studies):
        a, ref, t = _study(rng, n, effect, spread)
        n_bytes = np.round(t * rng.uniform(3, 5, n))  # 4 bytes a token on average: delta bpb known
        d = paired_difference(a, ref, t, doc_bytes=n_bytes)
        hits["delta_nll"] += d["nll_ci95"][0] <= TRUE_GAIN <= d["nll_ci95"][1]
        hits["delta_bpb"] += d["bpb_ci95"][0] <= TRUE_GAIN / (4 * math.log(2)) <= d["bpb_ci95"][1]
        hits["delta_ppl"] += d["ci95"][0] <= true_ppl <= d["ci95"][1]
        lo, hi = document_ci(ref, t, n_bytes, t)["token_ppl"]
        hits["token_ppl"] += lo <= math.exp(HARDNESS) <= hi
    return {k: v / studies for k, v in hits.items()}


def _check(studies: int, spreads: tuple, band: float):
    worst = 1.0
    for n in (8, 16):
        for effect in ("normal", "skewed"):
            for spread in spreads:
                got = _coverage(n, effect, spread, studies, seed=n * 100 + int(spread) + (effect == "skewed"))
                print(
                    f"coverage n={n} {effect} lengths x{spread:g} ({studies} studies): "
                    + ", ".join(f"{k} {v:.3f}" for k, v in got.items())
                )
                worst = min(worst, *got.values())
    print(f"worst coverage {worst:.3f} (band >= {band})")
    assert worst >= band


def test_intervals_cover_95_percent_at_8_and_16_documents():
    _check(studies=1000, spreads=(4,), band=FAST_BAND)


@pytest.mark.slow
def test_intervals_cover_95_percent_at_8_and_16_documents_4000_studies():
    _check(studies=4000, spreads=(2, 8, 20), band=BAND)


def test_equal_lengths_reduce_to_the_one_sample_t_interval_on_per_document_deltas():
    rng = np.random.default_rng(5)
    t = np.full(10, 700.0)
    ref = rng.uniform(2, 4, 10) * t
    a = ref + rng.normal(-0.03, 0.02, 10) * t
    got = paired_difference(a, ref, t)
    per_doc = (a - ref) / t
    closed = stats.ttest_1samp(per_doc, 0.0)
    ci = closed.confidence_interval(0.95)
    assert got["delta_nll"] == pytest.approx(per_doc.mean())
    assert got["nll_ci95"] == pytest.approx([ci.low, ci.high], rel=1e-9)
    assert got["p"] == pytest.approx(closed.pvalue, rel=1e-9)
    assert got["delta_ppl"] == pytest.approx(math.exp(a.sum() / t.sum()) - math.exp(ref.sum() / t.sum()))


def test_a_deterministic_difference_has_a_zero_width_interval_and_no_p_value():
    t = np.array([300.0, 900.0, 1200.0])
    ref = np.array([700.0, 2500.0, 3100.0])
    same = paired_difference(ref, ref, t)
    assert same["delta_nll"] == 0 and same["nll_ci95"] == [0, 0] and same["ci95"] == [0, 0]
    assert same["zero_width"] and same["p"] is None and not same["excludes_zero"]
    shifted = paired_difference(ref + 0.1 * t, ref, t)  # the same 0.1 nats on every token
    assert shifted["zero_width"] and shifted["p"] is None
    assert paired_difference(ref, ref[:-1], t) is None
    one = paired_difference(ref[:1] - 5, ref[:1], t[:1])  # one document: no spread to estimate
    assert one["delta_nll"] == pytest.approx(-5 / 300) and one["nll_ci95"] is None and one["p"] is None
    assert document_ci(ref[:1], t[:1], t[:1], t[:1]) == {"token_ppl": None, "word_ppl": None, "bits_per_byte": None}


def _holm_rejects(pvalues, alpha):
    """Holm's rule as stated: walk the sorted p-values, reject while p_(j) <= alpha / (m - j)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    rejected = set()
    for j, i in enumerate(order):
        if pvalues[i] > alpha / (len(pvalues) - j):
            break
        rejected.add(i)
    return rejected


def test_holm_adjusted_p_values_reject_exactly_what_holms_rule_rejects():
    rng = np.random.default_rng(2)
    for _ in range(300):
        p = list(rng.uniform(0, 0.1, rng.integers(1, 9)) ** rng.uniform(1, 3))
        adj = holm(p)
        assert all(a >= q for a, q in zip(adj, p)) and max(adj) <= 1
        for alpha in (0.01, 0.05, 0.1):
            assert {i for i, a in enumerate(adj) if a <= alpha} == _holm_rejects(p, alpha)
    assert holm([0.01, None, 0.04]) == [0.02, None, 0.04]
