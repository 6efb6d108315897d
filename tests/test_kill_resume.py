"""`kill -9` at 10 random moments of a multi-cell run, then a resume: no unreadable file at any
point, and every cell equal to an uninterrupted run's (SPEC 7: atomic writes, resume)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from tests.conftest import REPO, write_bench
from tta_bench.results.records import read_cell


def _start(bench, env):
    return subprocess.Popen(
        [sys.executable, "-m", "tta_bench", "run", str(bench), "--no-progress"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _until_cells_start(proc) -> list[str]:
    """Read the run's log up to the line that starts the cells (after the model is loaded)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if " cells in " in line:
            break
    return lines


def _results(run_dir) -> dict:
    """Per cell: what must not depend on interruptions (timings may)."""
    out = {}
    for f in (run_dir / "cells").glob("*.json"):
        rec = json.loads(f.read_text())
        out[f.stem] = (rec["status"], rec["metrics"]["nll_sum"], [d["nll"] for d in rec["per_doc"]], rec["resume_key"])
    return out


def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, corpus):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # log lines arrive as written
    methods = ["none", "cache", {"name": "dynamic-eval", "lr": 0.01}, {"name": "knn-lm", "index": "exact"}]
    for sub in ("ref", "killed"):
        (tmp_path / sub).mkdir()
    ref = write_bench(tmp_path / "ref", corpus, seeds=[0, 1], methods=methods)
    proc = _start(ref, env)
    _until_cells_start(proc)
    t0 = last = time.perf_counter()
    for line in proc.stdout:
        if "token ppl" in line:
            last = time.perf_counter()
    assert proc.wait(timeout=600) == 0
    per_cell = (last - t0) / 8  # seconds per cell of the uninterrupted run (the leaderboard after them not counted)
    expected = _results(tmp_path / "ref" / "results" / "t")
    assert len(expected) == 8

    bench = write_bench(tmp_path / "killed", corpus, seeds=[0, 1], methods=methods)
    run_dir = tmp_path / "killed" / "results" / "t"
    rng, finished = random.Random(0), []
    for i in range(10):
        left = 8 - (len(list((run_dir / "cells").glob("*.json"))) if run_dir.exists() else 0)
        proc = _start(bench, env)
        _until_cells_start(proc)
        # a random moment of what is left to run (cells, then the tables), the i-th kill in the i-th tenth of it
        time.sleep((i + rng.random()) / 10 * (left + 3) * per_cell)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        files = list((run_dir / "cells").glob("*.json")) if run_dir.exists() else []
        for f in files:
            rec, why = read_cell(f)
            assert rec is not None, f"{f}: {why}"
        finished.append(len(files))
    print("finished cells after each kill:", finished)
    assert len(set(finished)) >= 3, finished  # the kills landed at different stages of the run
    proc = _start(bench, env)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    assert _results(run_dir) == expected
    assert not [p for p in (run_dir / "cells").iterdir() if p.name.startswith(".")]
