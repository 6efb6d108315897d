"""Per-token logs and the report (`tta-bench report`): every number recomputed from the raw logs with plain loops."""

import json

import numpy as np
import pytest

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
        n_docs, total = len(log["doc_offsets"]) - 1, sum(diff)
        draws = np.random.default_rng(0).integers(0, n_docs, size=(1000, n_docs))
        for kind in ("frequency", "occurrence", "position"):  # each kind's buckets cover every token once
            assert sum(b["tokens"] for n, b in comp["buckets"].items() if n.startswith(kind)) == len(tokens)
        for name, got in comp["buckets"].items():
            inside = [i for i, (d, r, p, rep) in enumerate(tokens) if _naive_bucket(name, r, p, rep)]
            assert got["tokens"] == len(inside)
            if not inside:
                assert got["mean"] is None
                continue
            assert got["mean"] == pytest.approx(sum(diff[i] for i in inside) / len(inside), rel=1e-9, abs=1e-12)
            assert got["share"] == pytest.approx(sum(diff[i] for i in inside) / total, rel=1e-9)
            boot = []
            for draw in draws:  # the paired bootstrap, one resample at a time
                s = sum(diff[i] for d in draw for i in inside if tokens[i][0] == d)
                c = sum(1 for d in draw for i in inside if tokens[i][0] == d)
                if c:
                    boot.append(s / c)
            lo, hi = np.percentile(boot, [2.5, 97.5])
            assert got["ci95"] == pytest.approx([min(lo, got["mean"]), max(hi, got["mean"])], rel=1e-9, abs=1e-12)
        assert f"### {comp['method']} vs none" in text
    dyn = next(c for c in comparisons if c["method"].startswith("dynamic-eval"))
    assert abs(dyn["buckets"]["all"]["mean"]) > 1e-3  # the adaptation is visible, far above float noise


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
