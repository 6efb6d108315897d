"""`tta-bench prepare` runs each cell's preparation ahead of time; a later `run` only evaluates."""

from __future__ import annotations

import json

import pytest

from tests.conftest import cli, write_bench
from tta_bench.prepare import prepared
from tta_bench.run import runner

QUICK_FWL = {
    "name": "fwl",
    "size": 8,
    "train_tokens": 600,
    "val_tokens": 100,
    "train_window": 32,
    "train_seq_len": 64,
    "train_steps": 3,
    "eval_every": 0,
}
QUICK_KNN = {"name": "knn-lm", "k": 16}


def test_prepare_then_run_trains_nothing_and_builds_no_datastore(tmp_path, corpus, monkeypatch):
    """fwl (windows of 32) and knn-lm under segment 32, context 1: one forward pass over the prepare
    split serves both; after `prepare`, `run` finds the block and the features and says so."""
    monkeypatch.setenv("TTA_BENCH_CACHE", str(tmp_path / "cache"))
    bench = write_bench(
        tmp_path,
        corpus,
        protocol={"segment_len": 32, "context_len": 1, "reset": "document"},
        methods=["none", QUICK_FWL, QUICK_KNN],
    )
    logs = []
    assert runner.prepare(str(bench), progress=False, log=logs.append) == 3
    text = "\n".join(logs)
    assert "fwl-block built" in text and "features computed for" in text and "features cached" in text
    assert text.count("features computed for") == 1  # the kNN datastore reused FWL's pass
    import tta_bench_methods.fwl.method as fwl_method

    monkeypatch.setattr(fwl_method, "train_block", lambda *a, **k: pytest.fail("run trained the FWL block"))
    monkeypatch.setattr(
        prepared, "compute", lambda *a, **k: pytest.fail("run ran the base model over the prepare split")
    )
    logs.clear()
    run_dir = runner.run(str(bench), progress=False, log=logs.append)
    text = "\n".join(logs)
    assert "fwl-block cached" in text and "features cached" in text and "built" not in text and "computed" not in text
    recs = [json.loads(p.read_text()) for p in (run_dir / "cells").glob("*.json")]
    events = {r["config"]["method"]["name"]: r["prepare"]["cache"] for r in recs}
    # the block, then what its build read (reported so that its cost is charged, cached or not)
    assert [e["kind"] for e in events["fwl"]][0] == "fwl-block" and "features" in [e["kind"] for e in events["fwl"]]
    assert events["knn-lm"][0]["kind"] == "features"
    assert events["none"] == [] and all(e["hit"] for evs in events.values() for e in evs)


def test_prepare_command_line(tmp_path, corpus):
    bench = write_bench(tmp_path, corpus, methods=["none", QUICK_KNN])
    res = cli("prepare", str(bench), "--no-progress", env={"TTA_BENCH_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    assert (
        "prepare knn-lm(k=16)" in res.stdout
        and "features computed for" in res.stdout
        and "nothing to prepare" in res.stdout
    )
    assert not (tmp_path / "results").exists()  # prepare writes no results
    again = cli("prepare", str(bench), "--no-progress", env={"TTA_BENCH_CACHE": str(tmp_path / "cache")})
    assert "features cached" in again.stdout
    bad = cli("prepare", str(tmp_path / "missing.yaml"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr
