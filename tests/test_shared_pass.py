"""One base-model pass shared by the cells that read the frozen base (tta_bench/protocol/shared_pass.py):
the same scores and FLOPs as computing it in every cell, never a stale pass after the weights move,
and the pass's seconds charged to the cell that reads it."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import write_bench
from tta_bench.protocol.models import load_model
from tta_bench.protocol.shared_pass import SharedPasses

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["cache", {"name": "dynamic-eval", "lr": 0.03}, "none", {"name": "knn-lm", "k": 16}]


def _records(corpus, tmp_path, passes):
    from tta_bench.run.cellrun import StreamCache, run_cell
    from tta_bench.run.config import expand, load

    cells = expand(load(str(write_bench(tmp_path, corpus, methods=METHODS))), "cpu")
    lm, streams = load_model("tiny", device="cpu"), StreamCache()
    lm.passes = passes
    return {c.label: run_cell(c, lm, streams, progress=False) for c in cells}, lm


def test_shared_passes_change_no_score_and_no_flop(corpus, tmp_path):
    passes = SharedPasses()
    shared, _ = _records(corpus, tmp_path, passes)
    alone, _ = _records(corpus, tmp_path, None)
    assert passes.hits > 10  # the later cells read the passes of the first
    for label, rec in alone.items():
        assert [d["nll"] for d in shared[label].per_doc] == [d["nll"] for d in rec.per_doc], label
        assert shared[label].costs["flops"] == rec.costs["flops"], label
    # dynamic evaluation adapts the shared model, so it may never read a pass of the weights before
    assert (
        next(r for k, r in shared.items() if k.startswith("dynamic-eval")).metrics["nll_sum"]
        != shared["none"].metrics["nll_sum"]
    )


def test_a_pass_is_not_reused_once_a_weight_moved_or_a_gradient_is_wanted():
    lm = load_model("tiny", device="cpu")
    lm.passes = SharedPasses()
    ids = torch.randint(0, lm.vocab_size, (1, 12))
    with torch.no_grad():
        first = lm.hidden(ids)
        assert torch.equal(lm.hidden(ids), first) and lm.passes.hits == 1
        next(lm.model.parameters()).add_(0.5)  # an in-place step moves the version counter
        moved = lm.hidden(ids)
    assert lm.passes.hits == 1 and not torch.equal(moved, first)
    handle = lm.model.get_output_embeddings().register_forward_hook(lambda *a: None)
    with torch.no_grad():
        lm.hidden(ids)
        lm.hidden(ids)
    handle.remove()
    assert lm.passes.hits == 1  # a hook (say, an adapter's) may change the forward: no sharing
    for p in lm.model.parameters():
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            h = lm.hidden(ids)
        assert h.requires_grad and lm.passes.hits == 1  # a method training the base gets its own forward
    finally:
        for p in lm.model.parameters():
            p.requires_grad_(False)


def test_a_cell_reading_a_shared_pass_is_charged_its_seconds(monkeypatch):
    lm = load_model("tiny", device="cpu")
    lm.passes = SharedPasses()
    ids = torch.randint(0, lm.vocab_size, (1, 12))
    with torch.no_grad():
        lm.hidden(ids)
        key = lm.passes.key(lm.model, ids)
        lm.passes.entries[key].seconds = 7.25  # as if the pass had taken that long
        lm.take_charged_seconds()
        lm.hidden(ids)
    assert lm.take_charged_seconds() == 7.25 and lm.take_charged_seconds() == 0.0
