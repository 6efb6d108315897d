"""Beyond one machine (SPEC 8): groups of cells on a real local Ray instance and through submitit
(real subprocesses, and its debug executor) give the cells the local executor gives; torchrun
shares a cell's documents across processes with per-document NLL bit-identical to one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, write_bench
from tta_bench.run import runner

METHODS = ["none", {"name": "dynamic-eval", "lr": 0.01}]
# Workers run a group on `cpus: 1` thread; the local reference runs on one thread too, so that the
# float reductions, and the results, are the same bit for bit.
pytestmark = pytest.mark.usefixtures("one_thread")


def _results(run_dir) -> dict:
    """Per cell, what does not depend on where it ran (timings do)."""
    out = {}
    for f in (run_dir / "cells").glob("*.json"):
        rec = json.loads(f.read_text())
        out[f.stem] = (
            rec["status"],
            rec["label"],
            [d["nll"] for d in rec["per_doc"]],
            rec["metrics"]["nll_sum"],
            rec["resume_key"],
            rec["costs"]["flops"],
        )
    return out


def _run(bench):
    return runner.run(str(bench), log=lambda *a: None)


@pytest.fixture()
def local(tmp_path, corpus):
    (tmp_path / "reference").mkdir()
    return _results(_run(write_bench(tmp_path / "reference", corpus, seeds=[0, 1], methods=METHODS)))


def test_ray_runs_the_groups_on_a_local_instance_as_the_local_executor_does(tmp_path, corpus, local):
    pytest.importorskip("ray")
    (tmp_path / "ray").mkdir()
    bench = write_bench(tmp_path / "ray", corpus, seeds=[0, 1], methods=METHODS, executor={"name": "ray", "cpus": 1})
    run_dir = _run(bench)
    assert len(local) == 4 and _results(run_dir) == local
    assert (run_dir / "leaderboard.md").exists()
    logs = []
    runner.run(str(bench), log=logs.append)  # resume: nothing runs again
    assert any("4 cells in 2 groups, on ray" in line for line in logs) and not any("token ppl" in line for line in logs)


@pytest.mark.parametrize("cluster", ["local", "debug"])
def test_submitit_runs_the_groups_as_the_local_executor_does(tmp_path, corpus, local, cluster):
    pytest.importorskip("submitit")
    (tmp_path / f"submitit-{cluster}").mkdir()
    bench = write_bench(
        tmp_path / f"submitit-{cluster}",
        corpus,
        seeds=[0, 1],
        methods=METHODS,
        executor={"name": "slurm", "cluster": cluster, "shared_fs": cluster == "local"},
    )
    assert _results(_run(bench)) == local


def _torchrun(bench, n: int, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n}",
            "-m",
            "tta_bench",
            "run",
            str(bench),
            "--no-progress",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_torchrun_shares_out_documents_with_per_document_nll_bit_identical(tmp_path, corpus):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    methods = ["none", {"name": "dynamic-eval", "lr": 0.01}, "cache"]
    for name, limits in (("three", {"docs": 3}), ("one", {"docs": 1})):  # 3 documents on 2 ranks; a rank with none
        (tmp_path / name).mkdir()
        bench = write_bench(tmp_path / name, corpus, methods=methods, limits=limits)
        one = subprocess.run(
            [sys.executable, "-m", "tta_bench", "run", str(bench), "--no-progress"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert one.returncode == 0, one.stderr
        single = _results(tmp_path / name / "results" / "t")
        two = _torchrun(write_bench(tmp_path / name, corpus, methods=methods, limits=limits, run="sharded"), 2, env)
        assert two.returncode == 0, two.stderr[-3000:]
        sharded = _results(tmp_path / name / "results" / "sharded")
        assert set(sharded) == set(single) and len(single) == 3
        for cid, rec in single.items():
            assert sharded[cid][2] == rec[2], (name, rec[1])  # per-document NLL, bit for bit
            assert sharded[cid][3] == rec[3] and sharded[cid][5] == pytest.approx(rec[5])
        cells = [json.loads(p.read_text()) for p in (tmp_path / name / "results" / "sharded" / "cells").glob("*.json")]
        assert all(c["costs"]["ranks"] == 2 for c in cells)


# Runs `tta_bench run` in a torchrun rank and, once it has returned, names the threads still there.
THREADS_AFTER_RUN = """
import os, sys
from pathlib import Path
from tta_bench.cli import main

code = main(sys.argv[1:])
names = sorted(p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm"))
print(f"rank {os.environ['RANK']} threads:", *names)
sys.exit(code)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from /proc")
def test_torchrun_ranks_join_their_gloo_threads_before_the_interpreter_shuts_down(tmp_path, corpus):
    """Issue 21: a gloo worker thread still running at interpreter shutdown, releasing a finished
    collective's tensors, takes the GIL; Python ends the thread and the rank aborts (`terminate called
    without an active exception`). The run must free its process group, and so join those threads."""
    driver = tmp_path / "threads_after_run.py"
    driver.write_text(THREADS_AFTER_RUN)
    bench = write_bench(tmp_path, corpus, methods=["none"], limits={"docs": 3})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver)]
        + ["run", str(bench), "--no-progress"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = sorted(line for line in out.stdout.splitlines() if " threads:" in line)
    assert [line.split()[1] for line in lines] == ["0", "1"], out.stdout
    for line in lines:
        assert "pt_gloo_runloop" not in line.split() and "gloo_tcp_loop" not in line.split(), line


def test_torchrun_refuses_reset_never(tmp_path, corpus):
    bench = write_bench(tmp_path, corpus, protocol={"segment_len": 16, "context_len": 8, "reset": "never"})
    out = _torchrun(bench, 2, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert "cannot be shared out across processes" in out.stderr
    assert str(REPO / "tta_bench") not in out.stderr  # one line from each rank; the only traceback is torchrun's own
    assert not (tmp_path / "results").exists()


def test_a_requeued_slurm_job_skips_the_cells_it_already_wrote(tmp_path, corpus):
    """submitit requeues a preempted job with the same arguments (checkpoint); the rerun finds the
    cells written before the preemption and runs only the rest."""
    pytest.importorskip("submitit")
    from tta_bench.run.config import expand, load
    from tta_bench.run.executors import GroupJob, groups
    from tta_bench.run.options import RunOptions

    bench = write_bench(tmp_path, corpus, methods=METHODS, executor="slurm")
    cfg = load(str(bench))
    (group,) = groups(expand(cfg, "cpu"))
    args = (cfg.raw, str(bench), [c.cell_id for c in group], RunOptions(progress=False), {}, True)
    job = GroupJob()
    again = job.checkpoint(*args)
    assert again.function is job and again.args == args
    first = job(*args[:2], [group[0].cell_id], *args[3:])  # preempted after the first cell
    assert [r.label for r in first] == ["none"]
    rest = again.function(*again.args)
    assert [r.label for r in rest] == ["dynamic-eval(lr=0.01)"]
    assert len(list((tmp_path / "results" / "t" / "cells").glob("*.json"))) == 2
