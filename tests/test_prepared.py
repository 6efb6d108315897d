"""The harness's services to `prepare`: the shared feature pass over the prepare split and the one
cache for prepared state, each against an independent computation."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import SAMPLE
from tta_bench.prepare import prepared
from tta_bench.api.task import Document
from tta_bench.protocol.stream import tokenize
from tta_bench.api.errors import TTABenchError
from tta_bench.protocol.evaluate import Protocol
from tta_bench.prepare.prepared import PrepareData

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = [t * 3 for t in SAMPLE] + ["tiny", "x" * 70]


@pytest.fixture()
def lm(tiny_lm):
    return tiny_lm


def _stream(lm, texts=TEXTS, limit=None):
    return tokenize(
        [Document(f"d{i}", t) for i, t in enumerate(texts)], lm.tokenizer, "text", "train", limit_tokens=limit
    )


def _data(lm, stream, tmp_path):
    return PrepareData("train", lambda limit_tokens=None, limit_docs=None: stream, lm, root=tmp_path)


def _naive(lm, stream, protocol, tail):
    """One document at a time, one window at a time, batch 1: the hidden state and the last block's
    feed-forward input (read as the output of its post-attention norm) at every position."""
    seen = []
    handle = lm.model.model.layers[-1].post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.append(o))
    out = []
    try:
        for d, doc in enumerate(stream.docs):
            x = [lm.start_id] + doc.ids
            if protocol.reset == "never":
                x = [lm.start_id] + [t for e in stream.docs[:d] for t in e.ids] + doc.ids
            first = len(x) - len(doc.ids)
            rows = {"hidden": [], "ffn_input": []}
            W, S = protocol.window, protocol.segment_len
            for a in range(first, len(x), S):
                b = min(a + S, len(x))
                lo = a - 1 if (tail == "short" and b - a < S) else max(0, b - 1 - W)
                seen.clear()
                with torch.no_grad():
                    h = lm.model.model(input_ids=torch.tensor([x[lo : b - 1]])).last_hidden_state
                rows["hidden"].append(h[0, -(b - a) :])
                rows["ffn_input"].append(seen[0][0, -(b - a) :])
            out.append({k: torch.cat(v) for k, v in rows.items()})
    finally:
        handle.remove()
    return out


@pytest.mark.parametrize(
    "protocol,tail",
    [
        (Protocol(16, 1, "document"), "short"),
        (Protocol(16, 1, "document"), "protocol"),
        (Protocol(16, 8, "document"), "protocol"),
        (Protocol(8, 4, "never"), "protocol"),
    ],
)
@pytest.mark.parametrize("limit", [None, 300])
def test_features_equal_a_naive_loop(lm, tmp_path, protocol, tail, limit):
    stream = _stream(lm, limit=limit)
    assert stream.cut == (limit is not None)
    got = _data(lm, stream, tmp_path).features(stream, protocol, tail)
    want = _naive(lm, stream, protocol, tail)
    assert len(got) == len(want) == len(stream.docs)
    for g, w, doc in zip(got, want, stream.docs):
        assert g["hidden"].shape == (len(doc.ids), lm.hidden_size)
        for k in ("hidden", "ffn_input"):
            assert torch.allclose(g[k], w[k], atol=1e-5), k


def test_short_and_protocol_tails_differ_where_they_should(lm, tmp_path):
    """The check above could pass with the two tails equal: they must differ on a document's
    partial last window (more context in one than the other), and only there."""
    stream = _stream(lm)
    data = _data(lm, stream, tmp_path)
    short = data.features(stream, Protocol(16, 1, "document"), "short")
    full = data.features(stream, Protocol(16, 1, "document"), "protocol")
    for s, f, doc in zip(short, full, stream.docs):
        n, tail = len(doc.ids), len(doc.ids) % 16
        assert torch.equal(s["hidden"][: n - tail], f["hidden"][: n - tail])
        if n > 16 and tail and len(set(doc.ids)) > 1:  # (in a run of one repeated byte, context changes nothing)
            assert (s["hidden"][n - tail :] - f["hidden"][n - tail :]).abs().max() > 1e-3


def test_one_pass_serves_every_request_and_extends(lm, tmp_path, monkeypatch):
    """A shorter request reuses the pass (no forward over its complete documents); a longer one
    computes only the documents the pass lacks; the features of a document do not depend on the limit."""
    protocol = Protocol(16, 8, "document")
    full = _stream(lm)
    short = _stream(lm, limit=len(full.docs[0].ids) + len(full.docs[1].ids) + 5)
    data = _data(lm, full, tmp_path)
    a = data.features(short, protocol)
    ev, edges = data.events[-2:]  # the pass, then the cut document's rows (prepared state of their own)
    assert not ev["hit"] and ev["pass_tokens"] == len(full.docs[0].ids) + len(full.docs[1].ids)
    assert edges["kind"] == "feature-edges" and not edges["hit"]
    b = data.features(full, protocol)
    ev = data.events[-1]
    assert ev["kind"] == "features" and not ev["hit"] and ev["pass_tokens"] == sum(len(d.ids) for d in full.docs[2:])
    for d in range(2):
        assert torch.equal(a[d]["hidden"], b[d]["hidden"])
    calls = []
    real = lm.hidden_and_ffn_input
    monkeypatch.setattr(lm, "hidden_and_ffn_input", lambda ids: calls.append(ids.shape) or real(ids))
    again = data.features(full, protocol)
    assert data.events[-1]["hit"] and calls == []
    data.features(short, protocol)  # the cut document's rows are cached too: no forward at all
    assert [e["hit"] for e in data.events[-2:]] == [True, True] and calls == []
    assert all(torch.equal(x["ffn_input"], y["ffn_input"]) for x, y in zip(again, b))


def test_a_pass_cut_short_resumes_at_its_last_part(lm, tmp_path, monkeypatch):
    protocol = Protocol(16, 8, "document")
    stream = _stream(lm)
    monkeypatch.setattr(prepared, "PART_TOKENS", 1)  # a part per document
    real, done = prepared.compute, []

    def dies_on_the_third(lm, stream, protocol, docs, *a, **k):
        if docs.start == 2:
            raise KeyboardInterrupt
        done.append(docs.start)
        return real(lm, stream, protocol, docs, *a, **k)

    monkeypatch.setattr(prepared, "compute", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        _data(lm, stream, tmp_path).features(stream, protocol)
    folder = next((tmp_path / "features").iterdir())
    index = json.loads((folder / "index.json").read_text())
    assert [p["docs"] for p in index["parts"]] == [[0, 1], [1, 2]] and not list(folder.glob(".*tmp*"))
    monkeypatch.setattr(prepared, "compute", real)
    data = _data(lm, stream, tmp_path)
    got = data.features(stream, protocol)
    assert data.events[-1]["pass_tokens"] == sum(len(d.ids) for d in stream.docs[2:])
    want = _naive(lm, stream, protocol, "protocol")
    assert all(torch.allclose(g["hidden"], w["hidden"], atol=1e-5) for g, w in zip(got, want))


def test_changed_text_is_computed_again(lm, tmp_path):
    protocol = Protocol(16, 8, "document")
    # the same first document (so the same cached pass: it is keyed by content), other text after it
    one, other = _stream(lm), _stream(lm, TEXTS[:1] + [t[::-1] for t in TEXTS[1:]])
    _data(lm, one, tmp_path).features(one, protocol)
    data = _data(lm, other, tmp_path)
    got = data.features(other, protocol)
    assert data.events[-1]["pass_tokens"] == other.n_tokens
    assert torch.allclose(got[0]["hidden"], _naive(lm, other, protocol, "protocol")[0]["hidden"], atol=1e-5)


def test_short_tail_needs_context_one_and_document_reset(lm, tmp_path):
    stream = _stream(lm)
    with pytest.raises(TTABenchError, match="context_len 1"):
        _data(lm, stream, tmp_path).features(stream, Protocol(16, 8, "document"), "short")


def test_cached_state_is_built_once_per_key_and_never_half_written(lm, tmp_path):
    stream = _stream(lm)
    data = _data(lm, stream, tmp_path)
    builds = []

    def build(folder):
        builds.append(folder)
        (folder / "state.txt").write_text("trained")
        return {"steps": 3}

    first = data.cached("thing", stream, {"lr": 1}, build)
    again = data.cached("thing", stream, {"lr": 1}, build)
    other = data.cached("thing", stream, {"lr": 2}, build)
    other_data = data.cached("thing", _stream(lm, limit=50), {"lr": 1}, build)
    assert first == again and len({first, other, other_data}) == 3 and len(builds) == 3
    assert (first / "state.txt").read_text() == "trained"
    meta = json.loads((first / "meta.json").read_text())
    assert meta["info"] == {"steps": 3} and meta["key"]["model"] == lm.fingerprint
    assert [e["hit"] for e in data.events] == [False, True, False, False]

    def fails(folder):
        (folder / "half.txt").write_text("half")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        data.cached("thing", stream, {"lr": 3}, fails)
    assert not [p for p in (tmp_path / "prepared" / "thing").iterdir() if not (p / "meta.json").is_file()]
