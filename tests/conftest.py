"""Shared fixtures: the tiny model, small text corpora and bench files in temporary folders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests must not touch the user's cache or the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    if "TTA_BENCH_CACHE" not in os.environ:
        os.environ["TTA_BENCH_CACHE"] = str(tmp_path_factory.mktemp("tta_cache"))
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second thread, and OpenMP threads spinning against other
    processes on a shared 2-core machine make them up to 100x slower. Modules opt in by
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_lm():
    from tta_bench.protocol.models import load_model

    return load_model("tiny", device="cpu")


SAMPLE = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "A second document: numbers 12345 and words repeat, repeat, repeat.\nNew line here.\n",
    "Short one.\n",
    "Fourth document has ünïcödé characters and more text so that it spans several segments of a tiny model. " * 2,
]


@pytest.fixture()
def corpus(tmp_path) -> dict:
    """A `text` task with test and train splits, one document per file."""
    out = {}
    for split, texts in (("test", SAMPLE), ("train", [t[::-1] for t in SAMPLE])):
        folder = tmp_path / "corpus" / split
        folder.mkdir(parents=True)
        for i, t in enumerate(texts):
            (folder / f"doc{i}.txt").write_text(t, encoding="utf-8")
        out[split] = str(folder)
    return out


def write_bench(tmp_path: Path, corpus: dict, **overrides) -> Path:
    cfg = {
        "run": "t",
        "output_dir": str(tmp_path / "results"),
        "device": "cpu",
        "progress": False,
        "protocol": {"segment_len": 16, "context_len": 8, "reset": "document"},
        "models": ["tiny"],
        "tasks": [{"name": "text", "split": "test", "splits": corpus}],
        "methods": ["none"],
    }
    cfg.update(overrides)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def cli(*args, cwd=None, env=None):
    """Run `python -m tta_bench ...` in a fresh process."""
    import subprocess

    e = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tta_bench", *args], capture_output=True, text=True, cwd=cwd, env=e, timeout=600
    )
