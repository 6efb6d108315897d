"""Validity checks (SPEC 6): every registered method passes them on the tiny model; each deliberately
leaky method in tests/leaky_methods.py fails the check it violates, with the place and size of the
leak, which these tests work out independently (closed forms, a second naive comparison)."""

import json
import math
import os
import random
import re

import pytest
import torch

from tests.conftest import REPO, SAMPLE, write_bench
from tta_bench.api import registry
from tta_bench.checks.probes import perturbed
from tta_bench.checks.validity import CHECKS, CheckSettings, bench_settings, check_method, failures, option_variants
from tta_bench.protocol.stream import Stream, TokenizedDoc
from tta_bench.protocol.evaluate import Protocol, evaluate
from tta_bench.api.method import method_class

LEAKY = REPO / "tests" / "leaky_methods.py"
S = CheckSettings()


def _registered() -> list[str]:
    """Every method registered at collection time (built-ins, entry points, $TTA_BENCH_PLUGINS)."""
    registry.discover()
    return sorted(e.name for e in registry.REGISTRIES["method"].entries.values() if e.source != str(LEAKY))


def _prose(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    words = (
        "the model adapts to each document while it scores every token and learns from what it has"
        " seen before the next segment arrives with new words"
    ).split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(n_words // 12)]
    return "\n".join(lines) + "\n"


@pytest.fixture()
def task(tmp_path):
    """A `text` task: test = the shared SAMPLE documents, train = other text, one document per file."""
    splits = {}
    for split, texts in (("test", SAMPLE), ("train", [_prose(i, 120) for i in range(6)])):
        folder = tmp_path / "data" / split
        folder.mkdir(parents=True)
        for i, t in enumerate(texts):
            (folder / f"doc{i}.txt").write_text(t, encoding="utf-8")
        splits[split] = str(folder)
    return {"name": "text", "split": "test", "prepare_split": "train", "params": {"splits": splits}}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def leaky():
    registry.discover([str(LEAKY)])


def _check_stream(lm):
    """The check stream, written out: the first SAMPLE documents long enough, cut to 2.5, 1.5, 0.5 segments."""
    docs, need = [], list(S.doc_lengths)
    for text in SAMPLE:
        ids = lm.tokenizer.encode(text)[0]
        if need and len(ids) >= need[0]:
            docs.append(TokenizedDoc("", ids[: need.pop(0)], 0, 0))
    return Stream("text", "test", docs)


def _rows(lm, method, params, stream, reset):
    """All log-probabilities (N, V) a fresh, prepared instance gives the stream."""
    from tta_bench.run.cells import seed_everything

    seed_everything(0)
    cls = method_class(method)
    m = cls(lm, cls.make_params(params)[0], protocol=Protocol(S.segment_len, S.context_len, reset))
    m.prepare(None)
    rows = []
    evaluate(m, stream, m.protocol, progress=False, observer=lambda seg, lp, tg: rows.append(lp.clone()))
    getattr(m, "close", lambda: None)()
    return torch.cat(rows)


def _passed_except(report, failing):
    for c in CHECKS:
        if c == failing:
            assert report["checks"][c]["passed"] is False, c
        else:
            assert report["checks"][c]["passed"] is True, (c, report["checks"][c]["problems"])
    return report["checks"][failing]["problems"]


def _size(msg):
    return float(re.search(r"changed by up to ([0-9.e+-]+)", msg).group(1))


def _settings():
    """(method, option) for every registered method: its quick_params alone, then with each other value
    of each discrete option (Literal or bool parameter), so a combination or mode gets checked too."""
    out = []
    for name in _registered():
        try:
            options = [{}] + option_variants(method_class(name))
        except Exception:  # a method that cannot even be imported fails in its test, not at collection
            options = [{}]
        out += [pytest.param(name, o, id=name + "".join(f"[{k}={v}]" for k, v in o.items())) for o in options]
    return out


@pytest.mark.parametrize("name,option", _settings())
def test_every_registered_method_passes_every_check(tiny_lm, task, name, option):
    cls = method_class(name)
    report = check_method(tiny_lm, name, {**cls.quick_params, **option}, task)
    assert report["passed"], "\n".join(failures(report))
    assert all(report["checks"][c]["passed"] is True for c in CHECKS)  # none skipped on CPU


@pytest.mark.parametrize(
    "option",
    [o for o in [{}] + option_variants(method_class("fwl")) if o.get("fast", True)],
    ids=lambda o: "".join(f"[{k}={v}]" for k, v in o.items()) or "[quick]",
)
def test_the_checks_see_fwls_fast_path(tiny_lm, task, option):
    """In the checks' own settings (quick params, check stream and protocol), every fast FWL setting scores
    at least 100 x the causality tolerance away from its step-size-0 control: the checks exercise the fast
    weights, not only the slow block."""
    from tta_bench.checks.probes import CheckData, CheckInstance

    fwl = method_class("fwl")
    params = fwl.make_params({**fwl.quick_params, **option})[0]
    control = fwl.control(params)
    static = method_class("fwl-static").make_params({**fwl.quick_params, **control["params"]})[0]
    data = CheckData(tiny_lm, task, None)
    stream = data.check_stream(S.doc_lengths)
    rows = [
        CheckInstance(cls, p, tiny_lm, 0, Protocol(S.segment_len, S.context_len, "document"), data).run(stream)[1]
        for cls, p in ((fwl, params), (method_class("fwl-static"), static))
    ]
    assert (rows[0] - rows[1]).abs().max().item() >= 100 * S.atol


def test_causality_places_t_at_segment_and_document_boundaries_and_inside_under_both_resets(tiny_lm, task):
    report = check_method(tiny_lm, "none", {}, task)
    stream = _check_stream(tiny_lm)
    assert report["doc_tokens"] == [len(d.ids) for d in stream.docs] == list(S.doc_lengths)
    cases = {(c["reset"], c["at"]): c["t"] for c in report["checks"]["causality"]["details"]["cases"]}
    n0 = len(stream.docs[0].ids)
    for reset in ("document", "never"):
        seg, inside, doc = (
            cases[(reset, a)] for a in ("at a segment boundary", "inside a segment", "at a document boundary")
        )
        assert 0 < seg < n0 and seg % S.segment_len == 0  # a segment starts at t, within document 0
        assert 0 < inside < n0 and inside % S.segment_len != 0
        assert doc == n0  # the first token of document 1
    assert all(c["max_change"] == 0.0 for c in report["checks"]["causality"]["details"]["cases"])
    # the perturbation: every token from t on differs, none before it
    flat = [t for d in stream.docs for t in d.ids]
    for t in set(cases.values()):
        pert = [x for d in perturbed(stream, t, tiny_lm.vocab_size).docs for x in d.ids]
        assert pert[:t] == flat[:t] and all(a != b for a, b in zip(pert[t:], flat[t:]))


def test_peeking_at_the_target_fails_causality_at_t_by_the_mixture_closed_form(tiny_lm, task, leaky):
    lam = 0.1
    problems = _passed_except(check_method(tiny_lm, "leaky-peek", {"weight": lam}, task), "causality")
    assert len(problems) == 6  # every placement, both resets
    stream = _check_stream(tiny_lm)
    for msg in problems:
        reset, t = re.search(r"reset=(\w+), t=(\d+)", msg).groups()
        t = int(t)
        d = 0 if t < len(stream.docs[0].ids) else 1
        assert f"the distribution at position {t} (doc {d}, token {t - d * len(stream.docs[0].ids)})" in msg
        # row t is (1-lam) p + lam * onehot(token t) with p the base model's: changing token t to x'
        # moves log-probability at the old and the new token by log(1 + lam / ((1-lam) p))
        p = _rows(tiny_lm, "none", {}, stream, reset)[t].double().exp()
        old = [x for doc in stream.docs for x in doc.ids][t]
        new = [x for doc in perturbed(stream, t, tiny_lm.vocab_size).docs for x in doc.ids][t]
        expected = max(math.log1p(lam / ((1 - lam) * p[v].item())) for v in (old, new))
        assert _size(msg) == pytest.approx(expected, rel=1e-3)


def test_adapting_before_scoring_fails_causality_from_the_segment_start(tiny_lm, task, leaky):
    problems = _passed_except(check_method(tiny_lm, "leaky-adapt-first", {}, task), "causality")
    assert len(problems) == 6
    stream = _check_stream(tiny_lm)
    for msg in problems:
        reset, t = re.search(r"reset=(\w+), t=(\d+)", msg).groups()
        t = int(t)
        # the step on a segment's inputs moves every row of the segment holding t: the first changed
        # row is that segment's first (t itself when t starts a segment)
        seg_start = t if t in (S.segment_len, len(stream.docs[0].ids)) else t - t % S.segment_len
        assert f"at position {seg_start} " in msg
        if t == S.segment_len + S.segment_len // 2 and reset == "document":  # a second, naive comparison
            a = _rows(tiny_lm, "leaky-adapt-first", {}, stream, reset)
            b = _rows(tiny_lm, "leaky-adapt-first", {}, perturbed(stream, t, tiny_lm.vocab_size), reset)
            change = (a - b).abs().max(-1).values[: t + 1]
            assert change[:seg_start].max() == 0 and int(change.nonzero()[0]) == seg_start
            assert _size(msg) == pytest.approx(change[seg_start].item(), rel=1e-3)
            assert f"{int((change > S.atol).sum())} of {t + 1} positions <= t changed" in msg


def test_retrieving_with_a_segment_before_scoring_it_fails_causality_from_the_segment_start(tiny_lm, task, leaky):
    """ttt-nn in Hardt & Sun's order (the query holds the segment being scored): wherever the
    perturbation changes the chunks retrieved, the steps before scoring move the segment's first row."""
    problems = _passed_except(check_method(tiny_lm, "leaky-ttt-query-first", {}, task), "causality")
    assert problems  # the same method, score first, passes (test_every_registered_method_passes_every_check)
    for msg in problems:
        t = int(re.search(r"t=(\d+)", msg).group(1))
        seg_start = t - t % S.segment_len if t < S.doc_lengths[0] else t
        assert f"the distribution at position {seg_start} " in msg


def test_an_unnormalised_distribution_fails_normalisation_at_its_position(tiny_lm, task, leaky):
    shift = 0.25
    report = check_method(tiny_lm, "leaky-unnormalised", {"shift": shift, "doc": 1, "token": 5}, task)
    problems = _passed_except(report, "normalisation")
    pos = S.doc_lengths[0] + 5
    for msg in problems:
        assert f"at position {pos} (doc 1, token 5) the distribution sums to {math.exp(shift):.6g}" in msg
        assert "1 of 72 positions" in msg
    for reset in ("document", "never"):
        assert report["checks"]["normalisation"]["details"][reset]["max_abs_logsumexp"] == pytest.approx(
            shift, abs=1e-5
        )


@pytest.mark.parametrize("when", ["prepare", "score"])
def test_reading_the_evaluated_split_in_prepare_or_while_scoring_fails_split_separation(tiny_lm, task, leaky, when):
    path = os.path.join(task["params"]["splits"]["test"], "doc1.txt")
    problems = _passed_except(
        check_method(tiny_lm, "leaky-split", {"path": path, "when": when}, task), "split_separation"
    )
    assert problems == [
        f"split_separation (leaky-split): {when} opened {os.path.realpath(path)} ({os.path.getsize(path)} bytes),"
        " a file the task reads for the evaluated split 'test' (and not for 'train'); a method reads data"
        " only through PrepareData.load() and the segments it is given"
    ]
    # the same method fitted on what PrepareData serves is fine
    assert check_method(tiny_lm, "leaky-split", {}, task)["passed"]


def test_a_prepare_split_holding_the_evaluated_text_fails_split_separation(tiny_lm, task, leaky):
    same = {**task, "params": {"splits": {**task["params"]["splits"], "train": task["params"]["splits"]["test"]}}}
    report = check_method(tiny_lm, "leaky-split", {}, same)
    problems = _passed_except(report, "split_separation")
    # prepare got exactly the evaluated documents: every token of a document of at least k tokens is shared
    lengths = [len(tiny_lm.tokenizer.encode(t)[0]) for t in SAMPLE]
    shared = sum(n for n in lengths if n >= S.overlap_k)
    assert report["checks"]["split_separation"]["details"]["shared_tokens"] == [shared, sum(lengths)]
    assert f"{shared} of the {sum(lengths)} tokens prepare loaded from 'train'" in problems[0]


def test_unseeded_randomness_fails_determinism(tiny_lm, task, leaky):
    problems = _passed_except(check_method(tiny_lm, "leaky-unseeded", {}, task), "determinism")
    assert len(problems) == 1 and "two fresh runs with seed 0 gave nll_sum" in problems[0]
    assert "the first difference is at position 0 (doc 0, token 0)" in problems[0]  # the bias moves every row


def test_a_reset_that_keeps_state_fails_determinism_and_causality_runs_on_fresh_instances(tiny_lm, task, leaky):
    report = check_method(tiny_lm, "leaky-no-reset", {}, task)
    problems = _passed_except(report, "determinism")  # causality passes: the method is causal
    assert len(problems) == 1 and "again on the same prepared method" in problems[0] and "reset() must" in problems[0]
    nll = report["checks"]["determinism"]["details"]
    assert nll["nll_sum"][0] == nll["nll_sum"][1] != nll["nll_sum_after_reset"]
    assert len(report["checks"]["causality"]["details"]["cases"]) == 6


def test_a_method_that_leaves_the_shared_model_changed_fails_isolation_and_is_undone(tiny_lm, task, leaky):
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    problems = _passed_except(check_method(tiny_lm, "leaky-keeps-weights", {}, task), "isolation")
    assert len(problems) == 1 and "in lm_head.weight" in problems[0]
    after = tiny_lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())


def test_check_command_and_run_check_record_the_outcome(tmp_path, task, capsys, leaky):
    from tta_bench.cli import main
    from tta_bench.run.config import load
    from tta_bench.run.runner import run

    bench = write_bench(tmp_path, task["params"]["splits"], plugins=[str(LEAKY)], methods=["none", "leaky-peek"])
    assert main(["check", str(bench), "--only-bench", "--json", str(tmp_path / "checks.json")]) == 1
    out = capsys.readouterr().out
    assert re.search(r"none\s+ok", out) and re.search(r"leaky-peek\s+FAIL\s+failed: causality", out)
    reports = {r["method"]: r for r in json.loads((tmp_path / "checks.json").read_text())}
    assert reports["none"]["passed"] and not reports["leaky-peek"]["passed"]
    # without --only-bench: every registered method too, each with its quick_params
    names = {n for n, _, _ in bench_settings(load(str(bench)))}
    assert set(_registered()) | {"leaky-peek"} <= names

    run_dir = run(str(bench), check=True, log=lambda *a: None)
    cells = {
        c["config"]["method"]["name"]: c
        for c in map(lambda p: json.loads(p.read_text()), (run_dir / "cells").glob("*.json"))
    }
    assert cells["none"]["checks"]["passed"] is True
    peek = cells["leaky-peek"]["checks"]
    assert peek["passed"] is False and peek["checks"]["causality"]["passed"] is False
    assert peek["checks"]["normalisation"]["passed"] is True
