"""Per-token logs and the report (`tta-bench report`): every number recomputed from the raw logs with plain loops."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from tests.conftest import write_bench
from tta_bench.api.errors import TTABenchError
from tta_bench.results.report import buckets, write_report
from tta_bench.run.runner import run
from tta_bench.results.tokenlog import file_hash


def _naive_bucket(name, rank, position, repeated):
    kind, _, which = name.partition(": ")
    if name == "all":
        return True
    if kind == "frequency":
        return {"top 1k": 0 <= rank < 1000, "1k-10k": 1000 <= rank < 10000, "rarer": rank >= 10000, "unseen": rank < 0}[
            which
        ]
    if kind == "occurrence":
        return repeated if which == "repeated" else not repeated
    return {
        "< 128": position < 128,
        "128-512": 128 <= position < 512,
        "512-2k": 512 <= position < 2048,
        ">= 2k": position >= 2048,
    }[which]


def _naive_t(sums, counts):
    """The token-weighted mean's HC2 t-interval and p-value with Satterthwaite's df, in plain loops."""
    total = sum(counts)
    if len(counts) < 2:
        return None, None
    r = sum(sums) / total
    var = sum((a - r * w) ** 2 / (1 - w / total) for a, w in zip(sums, counts)) / total**2
    df = max(1.0, sum(w * w for w in counts) ** 2 / sum(w**4 for w in counts) - 1)
    q, se = stats.t.ppf(0.975, df), math.sqrt(var)
    return [r - q * se, r + q * se], 2 * stats.t.sf(abs(r) / se, df)


def _naive_tokens(log):
    """(doc, rank, position, repeated) of every token, one at a time."""
    out = []
    for d in range(len(log["doc_offsets"]) - 1):
        seen = set()
        for pos, i in enumerate(range(log["doc_offsets"][d], log["doc_offsets"][d + 1])):
            t = int(log["targets"][i])
            out.append((d, int(log["prep_rank"][i]), pos, t in seen))
            seen.add(t)
    return out


def _check_buckets(comp: dict, tokens: list, diff: list) -> None:
    """Each bucket's mean, interval, p-value and Holm mark against plain loops over the tokens."""
    tested = {}
    for name, got in comp["buckets"].items():
        inside = [i for i, (d, r, p, rep) in enumerate(tokens) if _naive_bucket(name, r, p, rep)]
        assert got["tokens"] == len(inside)
        if not inside:
            assert got["mean"] is None
            continue
        assert got["mean"] == pytest.approx(sum(diff[i] for i in inside) / len(inside), rel=1e-9, abs=1e-12)
        docs = sorted({tokens[i][0] for i in inside})  # per document: the bucket's sum and count
        sums = [sum(diff[i] for i in inside if tokens[i][0] == d) for d in docs]
        counts = [sum(1 for i in inside if tokens[i][0] == d) for d in docs]
        ci, p = _naive_t(sums, counts)
        if ci is None:
            assert got["ci95"] is None
            continue
        assert got["ci95"] == pytest.approx(ci, rel=1e-9, abs=1e-12)
        assert got["p"] == pytest.approx(p, rel=1e-9)
        tested[name] = p
    for rank, (name, p) in enumerate(sorted(tested.items(), key=lambda kv: kv[1])):  # Holm, by its rule
        stepdown = max(
            min(1, (len(tested) - j) * q)
            for j, (_, q) in enumerate(sorted(tested.items(), key=lambda kv: kv[1])[: rank + 1])
        )
        assert comp["buckets"][name]["p_holm"] == pytest.approx(stepdown)
        assert comp["buckets"][name]["significant"] == (stepdown < 0.05 and not comp["buckets"][name]["zero_width"])


def test_token_logs_add_up_and_the_report_matches_a_plain_loop(tmp_path, corpus):
    methods = ["none", {"name": "cache", "window": 64}, {"name": "dynamic-eval", "lr": 0.05}]
    bench = write_bench(tmp_path, corpus, methods=methods)
    run_dir = run(str(bench), log=lambda *a: None)
    said = []
    run(str(bench), log=said.append, log_tokens=True)  # finished cells without a log are computed again
    assert sum("recomputing" in s and "no per-token log" in s for s in said) == 3
    cells = [json.loads(p.read_text()) for p in (run_dir / "cells").glob("*.json")]
    logs = {}
    for rec in cells:
        path = run_dir / "cells" / rec["token_log"]["file"]
        assert file_hash(path) == rec["token_log"]["sha256"]
        with np.load(path) as f:
            log = {k: f[k] for k in f.files}
        assert log["logprob"].dtype == np.float32 and len(log["logprob"]) == rec["metrics"]["n_tokens"]
        nll = -log["logprob"].astype(np.float64)
        assert nll.sum() == pytest.approx(rec["metrics"]["nll_sum"], rel=1e-6)
        for d, doc in enumerate(rec["per_doc"]):
            assert nll[log["doc_offsets"][d] : log["doc_offsets"][d + 1]].sum() == pytest.approx(doc["nll"], rel=1e-6)
        logs[rec["label"]] = log
    report = write_report(run_dir)
    data = json.loads((run_dir / "REPORT.json").read_text())
    text = report.read_text()
    comparisons = data["tables"][0]["comparisons"]
    assert {(c["method"], c["against"]) for c in comparisons} == {
        ("cache(window=64)", "none"),
        ("dynamic-eval(lr=0.05)", "none"),
    }
    for comp in comparisons:
        log, ref = logs[comp["method"]], logs[comp["against"]]
        tokens = _naive_tokens(log)
        diff = [float(ref["logprob"][i]) - float(log["logprob"][i]) for i in range(len(tokens))]
        for kind in ("frequency", "occurrence", "position"):  # each kind's buckets cover every token once
            assert sum(b["tokens"] for n, b in comp["buckets"].items() if n.startswith(kind)) == len(tokens)
        _check_buckets(comp, tokens, diff)
        assert f"### {comp['method']} vs none" in text
    dyn = next(c for c in comparisons if c["method"].startswith("dynamic-eval"))
    assert abs(dyn["buckets"]["all"]["mean"]) > 1e-3  # the adaptation is visible, far above float noise
    # the claims table: each claimed method with its setting and testability, and dynamic evaluation's cost
    claims = text.split("### Against the papers' claims", 1)[1]
    row = next(line for line in claims.splitlines() if line.startswith("| dynamic-eval(lr=0.05) |"))
    assert "documents; mean base context" in row and any(f"| {v}:" in row for v in ("yes", "partly", "no"))
    assert "| dynamic-eval(lr=0.05) (cost) | over 3x" in claims and "### Setting" in text
    assert "share of total" not in text


def test_buckets_split_by_frequency_repetition_and_position():
    rng = np.random.default_rng(1)
    n = [3000, 700]
    targets = rng.integers(0, 50, sum(n)).astype(np.int32)
    ranks = np.array([-1, 5, 999, 1000, 9999, 10000, 40000])[rng.integers(0, 7, sum(n))].astype(np.int32)
    log = {
        "targets": targets,
        "prep_rank": ranks,
        "doc_offsets": np.array([0, n[0], sum(n)]),
        "logprob": np.zeros(sum(n), np.float32),
    }
    got = buckets(log)
    for i, (d, r, p, rep) in enumerate(_naive_tokens(log)):
        for name, mask in got.items():
            assert mask[i] == _naive_bucket(name, r, p, rep), (name, i)
    assert all(got[k].any() for k in got)  # every bucket is exercised


def test_the_report_needs_per_token_logs(tmp_path, corpus):
    run_dir = run(str(write_bench(tmp_path, corpus)), log=lambda *a: None)
    with pytest.raises(TTABenchError, match="log-tokens"):
        write_report(run_dir)
    assert not (run_dir / "REPORT.md").exists()


def _naive_context(tokens, segment, context):
    """Per the SPEC's windows: a segment of targets t[s:e] is scored from up to context + segment - (e - s)
    earlier tokens plus t[s:e-1]; count, for every target, the input tokens before it."""
    seen = 0
    for n in tokens:
        for i in range(n):
            s = i // segment * segment
            e = min(s + segment, n)
            window = range(max(0, s - (context + segment - (e - s))), e - 1)
            seen += sum(1 for k in window if k < i)
    return seen / sum(tokens)


def _rec(tokens, segment, context, reset, test_time, cache=(), params=None):
    from tta_bench.results.records import CellRecord

    return CellRecord(
        cell_id="c",
        label="m",
        config={},
        resolved={"segment_len": segment, "context_len": context, "reset": reset, "method_params": params or {}},
        per_doc=[{"nll": 1.0, "tokens": n, "bytes": n, "words": n} for n in tokens],
        role={"test_time": test_time},
        prepare={"cache": list(cache)},
    )


def test_the_setting_counts_steps_and_context_as_the_protocol_scores():
    from tta_bench.results.claims import mean_context, setting, testable

    for tokens, segment, context in (([1024, 700, 3000], 512, 1), ([300, 40], 64, 32), ([129], 128, 0)):
        assert mean_context(tokens, segment, context) == pytest.approx(_naive_context(tokens, segment, context))
    s = setting(_rec([1024, 2048, 300], 512, 1, "document", True))
    assert (s["documents"], s["steps_min"], s["steps_mean"]) == (3, 0, pytest.approx((1 + 3 + 0) / 3))
    assert testable(s, "one stream")[0] == "no" and "adaptation steps per document: 0" in testable(s, "")[1]
    s = setting(_rec([2048] * 4, 512, 1, "document", True))
    assert s["steps_min"] == 3 and testable(s, "") == ("yes", "the setting meets the paper's conditions")
    assert testable(s, "a continuous stream")[0] == "partly"
    trained = {"kind": "fwl-block", "info": {"steps": 40, "best_step": 30, "history": [{"step": 30, "val_nll": 2.0}]}}
    s = setting(_rec([2048] * 4, 512, 1, "document", False, [trained], {"train_steps": 40}))
    assert s["training"][0]["stopped_by"] == "step cap" and "step cap" in testable(s, "")[1]
    store = {"kind": "features", "tokens": 16384}
    s = setting(_rec([2048] * 4, 512, 1, "document", False, [store], {"datastore_tokens": None}))
    assert s["datastore_keys"] == 16384 and testable(s, "")[0] == "partly"


def test_a_claim_of_a_gain_is_supported_only_by_a_significant_one_of_some_size():
    from tta_bench.results.claims import NEGLIGIBLE, _consistent

    def d(delta, significant=True):
        return {"delta_nll": delta, "significant": significant, "declared": True, "excludes_zero": significant}

    assert _consistent("yes", d(-0.05), 16) == "consistent: a significant gain"
    assert _consistent("yes", d(-NEGLIGIBLE / 10), 16).startswith("not consistent: a significant but negligible gain")
    assert _consistent("yes", d(+0.05), 16) == "not consistent: significantly worse"
    assert _consistent("yes", d(-0.05, significant=False), 16) == "no significant effect at 16 documents"
    assert _consistent("no", d(-0.05), 16) == "not testable here"


def test_gains_most_lists_only_significant_gains():
    from tta_bench.results.report import gains_most

    def b(mean, significant):
        return {"mean": mean, "significant": significant}

    result = {"all": b(-0.5, True), "x": b(+0.2, True), "y": b(-0.1, False), "z": b(-0.03, True), "w": b(-0.3, True)}
    assert gains_most(result) == "w (-0.300); z (-0.030)"
    assert gains_most({"all": b(-1, True), "x": b(0.1, True)}) == "none significant"
