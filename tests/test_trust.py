"""Results you can trust (SPEC 2 and 7): split separation before any compute, a failing cell fails
alone, metrics that never raise after compute, resume keyed by everything that determines a result,
atomic writes with normal permissions, one run per folder, typed validation."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest

from tests.conftest import SAMPLE, write_bench
from tta_bench.run import cellrun, runner
from tta_bench.cli import main
from tta_bench.api.errors import TTABenchError
from tta_bench.protocol.metrics import document_ci, summarize

pytestmark = pytest.mark.usefixtures("one_thread")

# A plugin method that gives a non-finite log-probability in the document named by `doc`.
DIVERGING = '''
from dataclasses import dataclass
import torch
from tta_bench import register_method
from tta_bench.api.method import Method

@register_method("NAME")
class DivergesAt(Method):
    """Scores as the base model, but gives -inf to every target of document `doc`."""
    @dataclass
    class Params:
        doc: int = 1
    @classmethod
    def adapts_at_test_time(cls, params):
        return False
    @torch.no_grad()
    def score(self, seg):
        lp = self.lm.logprobs(seg.ids, seg.n)
        return torch.full_like(lp, float("-inf")) if seg.doc == self.params.doc else lp
'''


def _cells(run_dir):
    return {p.stem: json.loads(p.read_text()) for p in (run_dir / "cells").glob("*.json")}


def _run(bench, **kw):
    return runner.run(str(bench), log=kw.pop("log", lambda *a: None), **kw)


# -- split separation ---------------------------------------------------------------------------
def test_run_refuses_a_shared_run_of_tokens_before_any_compute(tmp_path, corpus, monkeypatch):
    """32 bytes of a test document inside the train split (a few words: validate cannot see it in
    words, the tiny model's byte tokens show it): run refuses before it evaluates or writes."""
    train = tmp_path / "corpus" / "train" / "doc9.txt"
    train.write_text("unrelated words here. " + SAMPLE[3][10:60] + " more.\n")
    bench = write_bench(tmp_path, corpus)
    assert main(["validate", str(bench)]) == 0
    monkeypatch.setattr(cellrun, "run_cell", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(
        TTABenchError,
        match=r"prepare split text:train shares a run of 32 tokens with the evaluated"
        r" document 'doc3.txt' \(token 10\)",
    ):
        _run(bench)
    assert not (tmp_path / "results").exists()


def test_a_given_fwl_checkpoint_is_checked_against_its_recorded_training_data(tmp_path, corpus):
    """A checkpoint trained (through prepare) on one corpus may not be given to a cell that evaluates it."""
    from tta_bench import cache_dir
    from tta_bench.api.method import method_class

    quick = {**method_class("fwl").quick_params, "train_window": 16, "train_seq_len": 32}
    bench = write_bench(tmp_path, corpus, methods=[{"name": "fwl", **quick}])
    _run(bench)
    ckpt = max(cache_dir().glob("prepared/fwl-block/*/block.safetensors"), key=os.path.getmtime)
    # evaluate the former train split, with the checkpoint trained on it
    swapped = {"test": corpus["train"], "train": corpus["test"]}
    bench2 = write_bench(tmp_path, swapped, run="t2", methods=[{"name": "fwl", **quick, "checkpoint": str(ckpt)}])
    with pytest.raises(TTABenchError, match=rf"FWL checkpoint {ckpt} \(its recorded training data\) (holds|shares)"):
        _run(bench2)
    # on the original split the same checkpoint is fine
    bench3 = write_bench(tmp_path, corpus, run="t3", methods=[{"name": "fwl", **quick, "checkpoint": str(ckpt)}])
    (rec,) = _cells(_run(bench3)).values()
    assert rec["status"] == "ok" and rec["resume_key"]["files"][str(ckpt)]


# -- failed cells ---------------------------------------------------------------------------------
def test_a_failing_cell_fails_alone_and_the_run_exits_1(tmp_path, corpus, capsys):
    plugin = tmp_path / "diverging.py"
    plugin.write_text(DIVERGING.replace("NAME", "diverges-at"))
    bench = write_bench(tmp_path, corpus, plugins=[str(plugin)], methods=["none", "diverges-at", "cache"])
    assert main(["run", str(bench)]) == 1
    err = capsys.readouterr().err
    assert "1 of 3 cells failed (diverges-at)" in err and len(err.strip().splitlines()) == 1
    cells = _cells(tmp_path / "results" / "t")
    status = {r["label"]: r["status"] for r in cells.values()}
    assert status == {"none": "ok", "diverges-at": "failed", "cache": "ok"}
    failed = next(r for r in cells.values() if r["status"] == "failed")
    assert "non-finite log-probability in document 1" in failed["reason"]
    log = (tmp_path / "results" / "t" / "cells" / failed["log"]).read_text()
    assert log.startswith("Traceback") and "TTABenchError" in log
    md = (tmp_path / "results" / "t" / "leaderboard.md").read_text()
    assert "**failed**: `diverges-at`: TTABenchError" in md and "| cache" in md and "| none" in md
    # a rerun retries the failed cell only
    assert main(["run", str(bench)]) == 1
    assert "2 done, 1 to run" in capsys.readouterr().out


# -- metrics --------------------------------------------------------------------------------------
def test_metrics_never_raise_and_intervals_hold_their_point():
    m = summarize(5000.0, 10, 40, 1)  # one "word" over 5000 nats: exp overflows
    assert m["word_ppl"] == math.inf and m["token_ppl"] == pytest.approx(math.exp(500))
    assert any("overflows" in n for n in m["notes"])
    m = summarize(12.0, 4, 0, 0)  # no words, no bytes
    assert m["word_ppl"] is None and m["bits_per_byte"] is None and len(m["notes"]) == 2
    # one document: no spread between documents to estimate, so no interval (and no exception)
    for nll in (0.1, 1.7, 3.3, 10.0 / 3):
        assert document_ci([nll * 7], [7], [30], [3]) == {"token_ppl": None, "word_ppl": None, "bits_per_byte": None}
    two = document_ci([5000.0, 4000.0], [1000, 1200], [4000, 5000], [1, 1])  # word ppl overflows: no interval
    point = summarize(9000.0, 2200, 9000, 2)["token_ppl"]
    assert two["word_ppl"] is None and two["token_ppl"][0] <= point <= two["token_ppl"][1]


def test_a_stream_without_words_still_gives_a_record_and_a_plot(tmp_path):
    folder = {"test": str(tmp_path / "test.txt"), "train": str(tmp_path / "train.txt")}
    (tmp_path / "test.txt").write_text("x" * 300)  # no whitespace: one word, no line ends
    (tmp_path / "train.txt").write_text("y" * 300)
    run_dir = _run(write_bench(tmp_path, folder))
    (rec,) = _cells(run_dir).values()
    assert rec["status"] == "ok" and rec["metrics"]["n_words"] == 1
    nll = rec["metrics"]["nll_sum"]  # hundreds of nats over one word: past a float
    assert nll > 710 and rec["metrics"]["word_ppl"] == math.inf and "overflows" in rec["metrics"]["notes"][0]
    assert list(run_dir.glob("plot-*.png"))


# -- resume keys ----------------------------------------------------------------------------------
def test_resume_recomputes_what_changed_and_says_so(tmp_path, corpus):
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "diverging.py").write_text(DIVERGING.replace("NAME", "diverges-late"))
    bench = write_bench(tmp_path, corpus, plugins=[str(plugin)], methods=["none", {"name": "diverges-late", "doc": 99}])
    logs = []
    run_dir = _run(bench, log=logs.append)
    first = _cells(run_dir)
    assert all(r["status"] == "ok" for r in first.values())
    key = next(iter(first.values()))["resume_key"]
    assert set(key) == {"config", "model", "data", "files", "code"} and set(key["code"]) == {
        "harness",
        "method",
        "task",
    }

    logs.clear()
    _run(bench, log=logs.append)
    assert any("2 done, 0 to run" in line for line in logs)

    # the method's code changes: its cell only
    (plugin / "diverging.py").write_text(DIVERGING.replace("NAME", "diverges-late") + "\n# a change\n")
    logs.clear()
    _run(bench, log=logs.append)
    assert any("1 done, 1 to run" in line for line in logs) and any(
        "stale: the code of method changed" in line for line in logs
    )

    # the data changes: every cell
    doc = tmp_path / "corpus" / "test" / "doc0.txt"
    doc.write_text(doc.read_text() + "One more sentence.\n")
    logs.clear()
    _run(bench, log=logs.append)
    assert (
        any("0 done, 2 to run" in line for line in logs)
        and sum("stale: the data changed" in line for line in logs) == 2
    )

    # a truncated file and a file of the wrong shape are recomputed, with a note
    files = sorted((run_dir / "cells").glob("*.json"))
    files[0].write_text(files[0].read_text()[:100])
    files[1].write_text(json.dumps({"schema": "tta-bench/cell/v2", "status": "ok"}))
    logs.clear()
    _run(bench, log=logs.append)
    assert any("0 done, 2 to run" in line for line in logs)
    assert any("unreadable" in line for line in logs) and any("malformed" in line for line in logs)
    assert all(r["status"] == "ok" for r in _cells(run_dir).values())


def test_the_leaderboard_refuses_stale_cells_beside_fresh_ones(tmp_path, corpus, capsys):
    run_dir = _run(write_bench(tmp_path, corpus, methods=["none", "cache"]))
    path = next(p for p in (run_dir / "cells").glob("*.json") if json.loads(p.read_text())["label"] == "cache")
    rec = json.loads(path.read_text())
    rec["resume_key"]["code"]["harness"] = "0" * 16  # computed by other code
    path.write_text(json.dumps(rec))
    assert main(["leaderboard", str(run_dir)]) == 2
    assert "disagree on code" in capsys.readouterr().err
    assert main(["leaderboard", str(run_dir), "--allow-mixed"]) == 0
    path.write_text("{ truncated")
    assert main(["leaderboard", str(run_dir)]) == 0  # an unreadable file is skipped with a note, never blocks
    assert "note: skipped" in capsys.readouterr().out


# -- files ----------------------------------------------------------------------------------------
def test_files_keep_normal_permissions_and_plots_are_written_atomically(tmp_path, corpus, monkeypatch):
    old = os.umask(0o022)
    try:
        run_dir = _run(write_bench(tmp_path, corpus))
    finally:
        os.umask(old)
    written = list((run_dir / "cells").glob("*")) + list(run_dir.glob("leaderboard.*")) + list(run_dir.glob("plot-*"))
    assert len(written) >= 7
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o644}

    import matplotlib.figure

    png = next(run_dir.glob("plot-*.png"))
    before = png.read_bytes()

    def full_disk(self, path, *a, **k):
        open(path, "wb").write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    from tta_bench.results.leaderboard import write_leaderboard

    with pytest.raises(OSError):
        write_leaderboard(run_dir)
    assert png.read_bytes() == before and not [p for p in run_dir.iterdir() if p.name.startswith(".")]


def test_a_second_run_into_the_same_folder_stops_with_a_message(tmp_path, corpus):
    from tta_bench.results.files import RunLock

    bench = write_bench(tmp_path, corpus)
    with RunLock(tmp_path / "results" / "t"):
        with pytest.raises(TTABenchError, match=r"another tta-bench run \(pid \d+ on .*\) is writing .*; wait for it"):
            _run(bench)
    assert not list((tmp_path / "results").glob("t/cells/*.json"))
    _run(bench)  # released


# -- validation -----------------------------------------------------------------------------------
def test_a_model_whose_vocabulary_is_smaller_than_its_tokenizers_ids_is_refused_at_load():
    from tta_bench.protocol.models import load_model

    with pytest.raises(TTABenchError, match="model tiny has 200 embedding rows but its tokenizer gives ids up to 257"):
        load_model("tiny", device="cpu", vocab_size=200)


def test_validate_names_the_plugin_files_it_imports(tmp_path, corpus, capsys):
    plugin = tmp_path / "diverging.py"
    plugin.write_text(DIVERGING.replace("NAME", "diverges-never"))
    bench = write_bench(tmp_path, corpus, plugins=[str(plugin)], methods=["diverges-never"])
    assert main(["validate", str(bench)]) == 0
    assert f"imported plugin code: {plugin}" in capsys.readouterr().err


def test_typed_parameters_refuse_what_yaml_gives_wrongly():
    from typing import Literal

    from tta_bench.api.params import coerce

    assert coerce("1e-3", float) == (True, 1e-3)
    assert coerce(float("nan"), float)[0] is False and coerce("inf", float)[0] is False
    assert coerce(True, int)[0] is False and coerce(2**63, int)[0] is False and coerce(2**63 - 1, int)[0]
    assert coerce("maybe", bool | Literal["auto"])[0] is False and coerce("auto", bool | Literal["auto"])[0]
    assert (
        coerce({"test": "a"}, dict[str, str]) == (True, {"test": "a"})
        and coerce({"test": 5}, dict[str, str])[0] is False
    )
    assert coerce(np.float64(0.5), float) == (True, 0.5)


def test_the_first_shared_run_is_found_as_a_naive_search_finds_it():
    from tta_bench.checks.separation import RUN, contains, first_overlap, stream_runs

    rng = np.random.default_rng(0)
    runs = np.unique(rng.integers(0, 2**63, 5000, dtype=np.uint64))
    probe = np.concatenate([runs[::7], rng.integers(0, 2**63, 500, dtype=np.uint64)])
    assert (contains(runs, probe) == np.isin(probe, runs)).all()
    prep = [list(rng.integers(0, 50, 300)) for _ in range(3)]
    for planted in (None, (1, 40), (2, 0)):  # (evaluated document, position) of a copied run
        ev = [list(rng.integers(50, 100, 200)) for _ in range(3)]
        if planted:
            d, pos = planted
            ev[d][pos : pos + RUN] = prep[2][100 : 100 + RUN]
        naive = next(
            (
                (i, j)
                for i, ids in enumerate(ev)
                for j in range(len(ids) - RUN + 1)
                if any(p[k : k + RUN] == ids[j : j + RUN] for p in prep for k in range(len(p) - RUN + 1))
            ),
            None,
        )
        assert first_overlap(stream_runs(prep), ev, prep) == naive == planted
    assert first_overlap(stream_runs(prep), [prep[1]], prep) == (0, None)  # a whole shared document
