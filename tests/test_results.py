"""Cell records, resume and leaderboards (SPEC 7)."""

import json

import pytest

from tests.conftest import write_bench
from tta_bench.run import cellrun, runner


def _run(bench, **kw):
    return runner.run(str(bench), log=lambda *a: None, **kw)


def test_cells_are_complete_records_and_a_rerun_resumes(tmp_path, corpus, monkeypatch):
    bench = write_bench(tmp_path, corpus, seeds=[0, 1])
    run_dir = _run(bench)
    files = sorted((run_dir / "cells").glob("*.json"))
    assert len(files) == 2 and not list((run_dir / "cells").glob(".*"))  # no temporary files left
    rec = json.loads(files[0].read_text())
    assert files[0].stem == rec["cell_id"]
    for key in ("config", "resolved", "stream", "metrics", "per_doc", "costs", "provenance"):
        assert key in rec
    prov = rec["provenance"]
    assert {"git", "versions", "device", "date", "seed"} <= set(prov) and "torch" in prov["versions"]
    assert {"commit", "dirty"} <= set(prov["git"])
    m = rec["metrics"]
    assert m["nll_sum"] == pytest.approx(sum(d["nll"] for d in rec["per_doc"]))
    assert m["n_tokens"] == sum(d["tokens"] for d in rec["per_doc"]) == rec["stream"]["n_tokens"]
    assert m["ci95"]["token_ppl"][0] <= m["token_ppl"] <= m["ci95"]["token_ppl"][1]
    c = rec["costs"]
    assert c["flops"]["forward.body"] > 0 and c["tokens_per_second"] > 0 and c["peak_memory_bytes"] > 0
    assert c["warmup_segments_excluded"] == 1

    mtimes = {f: f.stat().st_mtime_ns for f in files}
    calls = []
    monkeypatch.setattr(cellrun, "run_cell", lambda *a, **k: calls.append(1))
    _run(bench)
    assert calls == [] and {f: f.stat().st_mtime_ns for f in files} == mtimes
    monkeypatch.undo()
    _run(bench, force=True)
    assert all(f.stat().st_mtime_ns != mtimes[f] for f in files)
    # same config and seed on CPU: the same nll_sum (determinism)
    assert json.loads(files[0].read_text())["metrics"]["nll_sum"] == rec["metrics"]["nll_sum"]


def test_a_failing_cell_leaves_finished_cells_and_no_partial_file(tmp_path, corpus, monkeypatch):
    bench = write_bench(tmp_path, corpus, seeds=[0, 1, 2])
    real = cellrun.run_cell
    done = []

    def flaky(cell, *a, **k):
        if len(done) == 1:
            raise KeyboardInterrupt
        done.append(cell.cell_id)
        return real(cell, *a, **k)

    monkeypatch.setattr(cellrun, "run_cell", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(bench)
    cells = tmp_path / "results" / "t" / "cells"
    assert [p.stem for p in cells.glob("*.json")] == done and not list(cells.glob(".*"))


def test_leaderboard_rows_match_the_cells(tmp_path, corpus):
    import pandas as pd

    run_dir = _run(write_bench(tmp_path, corpus, seeds=[0, 1]))
    recs = [json.loads(p.read_text()) for p in (run_dir / "cells").glob("*.json")]
    table = pd.read_csv(run_dir / "leaderboard.csv")
    assert len(table) == 1
    row = table.iloc[0]
    assert row["method"] == "none" and row["seeds"] == 2
    assert row["token_ppl"] == pytest.approx(sum(r["metrics"]["token_ppl"] for r in recs) / 2)
    assert row["flops_x_none"] == pytest.approx(1.0) and row["time_x_none"] == pytest.approx(1.0)
    md = (run_dir / "leaderboard.md").read_text()
    assert "| none" in md and f"{row['token_ppl']:.2f}" in md and "device:" in md
