"""Provenance names what picks the kernels, and the reproduction check (SPEC 7) says which case it is
in: the same device class (1e-9 relative), other kernels (a measured tolerance), or published cells
that record no class; a cell beyond its case's tolerance is named."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, write_bench
from tta_bench.results.kernels import (
    CROSS_CPU_TOLERANCE,
    CROSS_GPU_TOLERANCE,
    SAME_CLASS_TOLERANCE,
    class_key,
    device_line,
    kernel_info,
)
from tta_bench.results.records import compare_published

pytestmark = pytest.mark.usefixtures("one_thread")


def here() -> dict:
    return kernel_info(torch.device("cpu"))


def test_provenance_names_what_picks_the_cpu_kernels():
    HERE = here()
    assert HERE["isa"] == torch.backends.cpu.get_cpu_capability() and HERE["threads"] == torch.get_num_threads()
    assert HERE["blas"].startswith(("mkl", "open", "blis", "accelerate", "unknown")) and HERE["cpu"]
    assert device_line(HERE) == f"CPU: {HERE['cpu']} ({HERE['isa']}), {HERE['threads']} threads"
    assert HERE["faiss"] is None  # no faiss method asked: the class of a none cell does not hang on faiss
    faiss = pytest.importorskip("faiss")
    with_faiss = kernel_info(torch.device("cpu"), ("faiss-cpu",))
    assert with_faiss["faiss"] == faiss.SIMDConfig.get_level_name() and class_key(with_faiss) != class_key(HERE)


def test_forced_generic_kernels_are_another_class():
    """ATEN_CPU_CAPABILITY=default makes torch dispatch its generic kernels: the provenance sees it."""
    HERE = here()
    code = "import torch, json; from tta_bench.results.kernels import kernel_info; print(json.dumps(kernel_info(torch.device('cpu'))))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    forced = json.loads(out.stdout)
    assert forced["isa"] == "DEFAULT" and forced["env"] == {**HERE["env"], "ATEN_CPU_CAPABILITY": "default"}
    assert class_key(forced) != class_key(HERE)


def _cell(cell_id, nll_sum, kernels):
    return {
        "schema": "tta-bench/cell/v2",
        "cell_id": cell_id,
        "label": cell_id,
        "status": "ok",
        "config": {"task": {}},
        "resume_key": {},
        "resolved": {},
        "stream": {"task": "t"},
        "costs": {},
        "metrics": {"nll_sum": nll_sum},
        "provenance": {"kernels": kernels} if kernels is not None else {},
    }


def _write(folder, cells):
    (folder / "cells").mkdir(parents=True)
    for rec in cells:
        (folder / "cells" / f"{rec['cell_id']}.json").write_text(json.dumps(rec))


def _compare(tmp_path, published_kernels, rel_offsets, mine=None):
    mine = mine or here()
    base = {"none": 3000.0, "cache": 2900.0}
    _write(tmp_path / "pub", [_cell(c, v, published_kernels) for c, v in base.items()])
    _write(tmp_path / "mine", [_cell(c, v * (1 + rel_offsets.get(c, 0.0)), mine) for c, v in base.items()])
    return compare_published(tmp_path / "mine", tmp_path / "pub", set(base))


def test_the_same_class_reproduces_within_1e_9(tmp_path):
    HERE = here()
    lines = _compare(tmp_path, HERE, {"none": 3e-10})
    assert len(lines) == 1 and lines[0].startswith("reproduction: 2 of 2 within 3.0e-10")
    assert "same device class" in lines[0] and f"tolerance {SAME_CLASS_TOLERANCE:g}" in lines[0]


def test_a_hand_edited_cell_is_named(tmp_path):
    HERE = here()
    lines = _compare(tmp_path, HERE, {"cache": 2e-9})
    assert lines[0].startswith("reproduction: 1 of 2 differ") and "largest 2.0e-09" in lines[0]
    assert len(lines) == 2 and lines[1].strip().startswith("cache on t:") and "2.00e-09 relative" in lines[1]


def test_other_kernels_use_the_measured_tolerance_and_say_what_differs(tmp_path):
    HERE = here()
    other = {**HERE, "isa": "AVX512" if HERE["isa"] != "AVX512" else "AVX2"}
    lines = _compare(tmp_path, other, {"none": 4e-6, "cache": -1e-6})
    assert (
        lines[0].startswith("reproduction: 2 of 2 within 4.0e-06") and f"tolerance {CROSS_CPU_TOLERANCE:g}" in lines[0]
    )
    assert f"other kernels ({other['isa']} there, {HERE['isa']} here)" in lines[0]
    assert _compare(tmp_path / "far", other, {"cache": 3 * CROSS_CPU_TOLERANCE})[0].startswith(
        "reproduction: 1 of 2 differ"
    )


def test_cells_that_record_no_class_are_compared_across_classes(tmp_path):
    lines = _compare(tmp_path, None, {"none": 5e-6})
    assert lines[0].startswith("reproduction: 2 of 2 within 5.0e-06") and "record no device class" in lines[0]
    assert f"tolerance {CROSS_CPU_TOLERANCE:g}" in lines[0]


def test_a_gpu_against_a_cpu_uses_the_gpu_tolerance(tmp_path):
    gpu = {
        "kind": "cuda",
        "gpu": "NVIDIA H200",
        "compute_capability": "9.0",
        "cuda": "12.6",
        "cudnn": 90100,
        "tf32_matmul": False,
        "tf32_cudnn": True,
        "float32_matmul_precision": "highest",
        "fp16_reduced_precision": True,
        "bf16_reduced_precision": True,
        "env": {},
    }
    lines = _compare(tmp_path, gpu, {"none": 2e-4})
    assert (
        lines[0].startswith("reproduction: 2 of 2 within 2.0e-04") and f"tolerance {CROSS_GPU_TOLERANCE:g}" in lines[0]
    )
    assert "GPU: NVIDIA H200 (sm 9.0, CUDA 12.6, no TF32) there" in lines[0]


def test_a_run_records_the_kernels_and_reports_the_case(tmp_path, corpus):
    """End to end: a run compared with its own cells (copied as if published) is the same class; the
    same cells with their class edited are compared across classes; with an nll_sum edited, that cell
    is named."""
    HERE = here()
    from tta_bench.run.runner import run

    bench = write_bench(tmp_path, corpus, methods=["none", "cache"])
    run_dir = run(str(bench), log=lambda s: None)
    recs = [json.loads(p.read_text()) for p in sorted((run_dir / "cells").glob("*.json"))]
    assert all(r["provenance"]["kernels"] == HERE and r["costs"]["device"] == device_line(HERE) for r in recs)

    def published(edit):
        folder, cells = tmp_path / f"pub-{len(list(tmp_path.glob('pub-*')))}", copy.deepcopy(recs)
        for r in cells:
            edit(r)
        _write(folder, cells)
        return compare_published(run_dir, folder, {r["cell_id"] for r in recs})

    assert "2 of 2 within 0.0e+00" in published(lambda r: None)[0]
    other = published(lambda r: r["provenance"]["kernels"].update(isa="SOMETHING ELSE"))
    assert "other kernels (SOMETHING ELSE there" in other[0]
    edited = published(
        lambda r: r["metrics"].update(nll_sum=r["metrics"]["nll_sum"] * (1 + 1e-6)) if r["label"] == "cache" else None
    )
    assert edited[0].startswith("reproduction: 1 of 2 differ") and edited[1].strip().startswith("cache on ")
