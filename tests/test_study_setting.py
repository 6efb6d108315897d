"""What a study gives each method (SPEC 4): documents drawn at random among those long enough (the draw
recorded in every cell), ranges of a split's documents so that tuning documents are held out from
prepare, and several seeds for the methods whose result depends on one."""

from __future__ import annotations

import random

import pytest

from tests.conftest import SHARED_DATA, write_bench
from tta_bench.api.errors import TTABenchError
from tta_bench.api.registry import get
from tta_bench.api.task import Document, parse_split
from tta_bench.protocol.lm import ByteTokenizer
from tta_bench.protocol.stream import Draw, tokenize

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [Document(f"d{i}", "x" * n) for i, n in enumerate([5, 40, 12, 60, 33, 8, 90, 41, 2, 70])]


def test_a_random_draw_is_a_seeded_sample_of_the_documents_long_enough_in_stream_order():
    got = tokenize(DOCS, ByteTokenizer(), "t", "test", limit_docs=3, draw=Draw("random", 30, seed=7))
    long_enough = [i for i, d in enumerate(DOCS) if len(d.text) >= 30]
    expected = sorted(random.Random(7).sample(long_enough, 3))  # the draw, computed independently
    assert got.draw["chosen"] == expected and got.draw["long_enough"] == len(long_enough) == 6
    assert [d.title for d in got.docs] == [f"d{i}" for i in expected]
    again = tokenize(DOCS, ByteTokenizer(), "t", "test", limit_docs=3, draw=Draw("random", 30, seed=7))
    assert again.fingerprint == got.fingerprint and again.draw == got.draw
    others = [tokenize(DOCS, ByteTokenizer(), "t", "test", limit_docs=3, draw=Draw("random", 30, s)) for s in range(12)]
    assert len({tuple(o.draw["chosen"]) for o in others}) > 3  # the seed moves the draw
    assert len({o.fingerprint for o in others}) == len({tuple(o.draw["chosen"]) for o in others})


def test_asking_for_more_documents_than_are_long_enough_takes_all_of_them_and_says_how_many():
    got = tokenize(DOCS, ByteTokenizer(), "t", "test", limit_docs=50, draw=Draw("random", 50, seed=0))
    assert got.draw["chosen"] == [3, 6, 9] and got.draw["asked"] == 50 and got.draw["long_enough"] == 3
    first = tokenize(DOCS, ByteTokenizer(), "t", "test", limit_docs=2, doc_tokens=35, draw=Draw("first", 30))
    assert [d.title for d in first.docs] == ["d1", "d3"] and [len(d.ids) for d in first.docs] == [35, 35]


def test_a_cell_records_its_draw_and_the_bench_refuses_a_bad_one(corpus, tmp_path):
    from tta_bench.run.cellrun import StreamCache, run_cell
    from tta_bench.run.config import expand, load, read_yaml, validate
    from tta_bench.protocol.models import load_model

    limits = {"docs": 2, "draw": "random", "draw_seed": 3, "min_doc_tokens": 20}
    (cell,) = expand(load(str(write_bench(tmp_path, corpus, limits=limits))), "cpu")
    record = run_cell(cell, load_model("tiny", device="cpu"), StreamCache(), progress=False)
    draw = record.stream["draw"]
    assert draw["seed"] == 3 and draw["asked"] == 2 and len(draw["chosen"]) == record.stream["n_docs"] == 2
    assert all(d["tokens"] >= 20 for d in record.per_doc)
    for bad, says in (({"draw": "sometimes"}, "first or random"), ({"draw_seed": -1}, "draw_seed")):
        path = write_bench(tmp_path, corpus, limits=bad)
        cfg, problems = validate(read_yaml(str(path)), str(path))
        assert cfg is None and any(says in p for p in problems)
    # a bench that draws nothing keeps its config, so the ids of its cells do not move
    (plain,) = expand(load(str(write_bench(tmp_path, corpus, limits={"docs": 2}))), "cpu")
    assert set(plain.limits) == {"docs", "tokens", "doc_tokens"}


def test_ranges_of_a_split_partition_its_documents():
    wiki = get("task", "wikitext-2")(data_dir=str(SHARED_DATA / "wikitext-2"))
    whole = wiki.split_documents("valid")
    head, rest = wiki.split_documents("valid[:3]"), wiki.split_documents("valid[3:]")
    assert [d.title for d in head + rest] == [d.title for d in whole] and len(head) == 3
    assert wiki.split_documents("valid[2:4]") == whole[2:4]
    assert parse_split("valid") == ("valid", None)
    for bad in ("valid[", "valid[a:b]", "valid[4:2]"):
        with pytest.raises(TTABenchError, match="valid"):
            parse_split(bad)
    assert "name[start:stop]" in wiki.split_problem("valid[x]")


def test_tuning_documents_held_out_from_prepare_validate_and_overlapping_ones_are_refused(tmp_path):
    from tta_bench.run.config import read_yaml, validate

    wiki = str(SHARED_DATA / "wikitext-2")
    grid = {"name": "dynamic-eval", "lr": [1e-4, 1e-3]}

    def problems(select_on, prepare):
        task = {"name": "wikitext-2", "data_dir": wiki, "split": "test", "prepare_split": prepare}
        path = write_bench(tmp_path, {}, tasks=[task], methods=[{**grid, "select_on": select_on}])
        return validate(read_yaml(str(path)), str(path))[1]

    assert problems("valid[:2]", "valid[2:]") == []
    overlap = problems("valid[:3]", "valid[2:]")
    assert len(overlap) == 1 and "holds the evaluated document" in overlap[0] and "select_on" in overlap[0]


def test_a_method_with_its_own_seeds_runs_them_and_the_others_run_the_benchs(corpus, tmp_path):
    from tta_bench.run.config import expand, load, read_yaml, validate

    methods = ["none", {"name": "dynamic-eval", "lr": 0.01, "seeds": [0, 1, 2]}]
    cells = expand(load(str(write_bench(tmp_path, corpus, methods=methods, seeds=[5]))), "cpu")
    got = sorted((c.method["name"], c.seed) for c in cells)
    assert got == [("dynamic-eval", 0), ("dynamic-eval", 1), ("dynamic-eval", 2), ("none", 5)]
    assert all("seeds" not in c.method for c in cells)  # a cell holds its one seed
    bad = write_bench(tmp_path, corpus, methods=[{"name": "none", "seeds": [1, 1]}])
    assert validate(read_yaml(str(bad)), str(bad))[1] == ["methods[0].seeds: a seed is listed twice; list each once"]
