"""Lanes (SPEC 2): under reset document, N documents scored side by side, each lane with its own state.
Lanes change no score (per-document NLL at 1, 2 and 7 lanes within 1e-6 relative, on documents of
different lengths, so shorter inputs are padded), no FLOP per scored token (the padding is counted
apart), and a method that does not run in lanes runs with one and says so."""

from __future__ import annotations

import random

import pytest

from tests.conftest import write_bench
from tta_bench.api import registry
from tta_bench.api.method import method_class
from tta_bench.protocol.flops import PADDING
from tta_bench.protocol.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

# lengths in bytes (the tiny model's tokens): one shorter than a segment, several that end mid-segment
LENGTHS = [150, 37, 96, 9, 210, 64, 123, 51, 180]
# methods whose lanes each adapt their own weights (methods/_common/lanes.py): grouped by shape, no padding
OWN_WEIGHTS = {"dynamic-eval", "finetune-dynamic-eval", "ttt-nn", "ttt-random"}  # fwl-dynamic-eval pads its base
WORDS = "the of cache lane state a document repeat model token fast weight and to in it is".split()


def _text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    out = ""
    while len(out) < n:
        out += rng.choice(WORDS) + " "
    return out[:n]


def _builtin_settings() -> list:
    """Every method registered at collection time but the tests' deliberately leaky ones, with its
    quick params alone and with each of its check variants (FWL's memory options among them)."""
    registry.discover()
    out = []
    for name in sorted(registry.REGISTRIES["method"].entries):
        if "leaky" in str(registry.REGISTRIES["method"].entries[name].source):
            continue
        cls = method_class(name)
        for i, variant in enumerate([{}] + list(cls.check_variants)):
            out.append(pytest.param(name, {**cls.quick_params, **variant}, id=f"{name}-{i}"))
    return out


@pytest.fixture(scope="module")
def lane_corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lanes")
    out = {}
    for split, lengths in (("test", LENGTHS), ("train", [900] * 4)):
        folder = root / split
        folder.mkdir()
        for i, n in enumerate(lengths):
            (folder / f"doc{i}.txt").write_text(_text(1000 * (split == "train") + i, n), encoding="utf-8")
        out[split] = str(folder)
    return out


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny", device="cpu")


def _record(lm, corpus, tmp_path, name, lanes, params=None):
    from tta_bench.run.cellrun import StreamCache, run_cell
    from tta_bench.run.config import expand, load

    params = method_class(name).quick_params if params is None else params
    task = {"name": "text", "split": "test", "prepare_split": "train", "splits": corpus}
    protocol = {"segment_len": 16, "context_len": 8, "reset": "document", "lanes": lanes}
    bench = write_bench(
        tmp_path,
        corpus,
        tasks=[task],
        protocol=protocol,
        methods=[{"name": name, **{k: [v] if isinstance(v, list) else v for k, v in params.items()}}],
    )  # a list is a grid
    (cell,) = expand(load(str(bench)), "cpu")
    return run_cell(cell, lm, StreamCache(), progress=False)


def _per_token(costs) -> dict:
    return {k: v for k, v in costs["flops_per_token"].items() if not k.startswith(PADDING)}


@pytest.mark.parametrize("name,params", _builtin_settings())
def test_lanes_change_no_score_and_no_flop_per_token(lm, lane_corpus, tmp_path, name, params):
    cls = method_class(name)
    in_lanes = cls.runs_in_lanes(cls.make_params(params)[0])
    one = _record(lm, lane_corpus, tmp_path, name, 1, params)
    assert one.ok, one.reason
    for lanes in (2, 7) if in_lanes else (7,):  # a method that does not run in lanes runs one lane
        rec = _record(lm, lane_corpus, tmp_path, name, lanes, params)
        assert rec.ok, rec.reason
        assert rec.costs["lanes"] == (lanes if in_lanes else 1)
        assert ("lanes_note" in rec.costs) == (not in_lanes)
        for a, b in zip(one.per_doc, rec.per_doc):
            assert b["nll"] == pytest.approx(a["nll"], rel=1e-6), (name, lanes, a["title"])
        assert _per_token(rec.costs) == pytest.approx(_per_token(one.costs), rel=1e-9), (name, lanes)
        padded = [k for k in rec.costs["flops"] if k.startswith(PADDING)]
        # documents of unequal lengths: some step pads a shorter input, but for the methods whose lanes
        # run their own weights (one vmapped forward per input shape, never padded)
        assert bool(padded) == (in_lanes and name not in OWN_WEIGHTS)
        assert all(rec.costs["flops"][k] > 0 for k in padded)


def test_the_invariance_test_would_see_lanes_that_share_state(lm, lane_corpus, tmp_path, monkeypatch):
    """The cache's effect on a document is far above the 1e-6 the lanes test allows, so a cache shared
    by the lanes (each lane reading the others' positions) fails it."""
    cache = _record(lm, lane_corpus, tmp_path, "cache", 1)
    none = _record(lm, lane_corpus, tmp_path, "none", 1)
    effects = [abs(c["nll"] - n["nll"]) / n["nll"] for c, n in zip(cache.per_doc, none.per_doc)]
    assert max(effects) > 1e-3
    cls = method_class("cache")
    opened = cls.open_lanes

    def one_cache_for_all(self, n):
        opened(self, n)
        for part in self.caches[1:]:
            part.cache = self.caches[0].cache  # every lane reads and fills lane 0's positions

    monkeypatch.setattr(cls, "open_lanes", one_cache_for_all)
    shared = _record(lm, lane_corpus, tmp_path, "cache", 7)
    worst = max(abs(s["nll"] - c["nll"]) / c["nll"] for s, c in zip(shared.per_doc, cache.per_doc))
    assert worst > 1e-4


def test_the_invariance_test_would_see_lanes_that_keep_another_documents_weights(
    lm, lane_corpus, tmp_path, monkeypatch
):
    """Dynamic evaluation's effect on a document is far above 1e-6, so lanes whose weights are not put
    back when a lane takes its next document (it starts from the last one's) fail the lanes test."""
    from tta_bench_methods._common.lanes import LaneWeights

    dyn = _record(lm, lane_corpus, tmp_path, "dynamic-eval", 1)
    none = _record(lm, lane_corpus, tmp_path, "none", 1)
    assert max(abs(d["nll"] - n["nll"]) / n["nll"] for d, n in zip(dyn.per_doc, none.per_doc)) > 1e-3
    monkeypatch.setattr(LaneWeights, "reset", lambda self, lane: None)
    kept = _record(lm, lane_corpus, tmp_path, "dynamic-eval", 2)
    assert max(abs(k["nll"] - d["nll"]) / d["nll"] for k, d in zip(kept.per_doc, dyn.per_doc)) > 1e-4


def test_a_method_that_does_not_run_in_lanes_runs_one_lane_and_says_so(lm, lane_corpus, tmp_path, monkeypatch):
    one = _record(lm, lane_corpus, tmp_path, "cache", 1)
    monkeypatch.setattr(method_class("cache"), "runs_in_lanes", classmethod(lambda cls, params: False))
    rec = _record(lm, lane_corpus, tmp_path, "cache", 4)
    assert rec.costs["lanes"] == 1 and "does not run in lanes" in rec.costs["lanes_note"]
    assert [r["nll"] for r in rec.per_doc] == [o["nll"] for o in one.per_doc]
    assert not [k for k in rec.costs["flops"] if k.startswith(PADDING)]


def test_lanes_under_reset_never_are_refused_with_one_line(lane_corpus, tmp_path):
    from tta_bench.run.config import read_yaml, validate

    protocol = {"segment_len": 16, "context_len": 8, "reset": "never", "lanes": 4}
    bench = write_bench(tmp_path, lane_corpus, protocol=protocol)
    cfg, problems = validate(read_yaml(str(bench)), str(bench))
    assert cfg is None and len(problems) == 1
    assert problems[0].startswith("protocol.lanes: 4 lanes need reset: document") and "\n" not in problems[0]
    bench = write_bench(tmp_path, lane_corpus, protocol={**protocol, "reset": "document", "lanes": 0})
    assert validate(read_yaml(str(bench)), str(bench))[1] == ["protocol.lanes: must be a positive integer, got 0"]


def test_one_lane_keeps_the_cell_ids_of_a_bench_without_lanes(lane_corpus, tmp_path):
    from tta_bench.run.config import expand, load

    plain = write_bench(tmp_path, lane_corpus, protocol={"segment_len": 16, "context_len": 8})
    ids = [c.cell_id for c in expand(load(str(plain)), "cpu")]
    one = write_bench(tmp_path, lane_corpus, protocol={"segment_len": 16, "context_len": 8, "lanes": 1})
    assert [c.cell_id for c in expand(load(str(one)), "cpu")] == ids
    four = write_bench(tmp_path, lane_corpus, protocol={"segment_len": 16, "context_len": 8, "lanes": 4})
    assert [c.cell_id for c in expand(load(str(four)), "cpu")] != ids
