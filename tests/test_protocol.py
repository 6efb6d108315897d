"""The evaluation protocol (SPEC 2) against independent computations."""

import math

import pytest
import torch

from tta_bench.api.task import Document
from tta_bench.protocol.stream import tokenize
from tta_bench.protocol.evaluate import Protocol, evaluate, segments
from tta_bench.api.method import method_class
from tests.conftest import SAMPLE


def _stream(lm, texts=SAMPLE):
    return tokenize([Document(f"d{i}", t) for i, t in enumerate(texts)], lm.tokenizer, "text", "test")


def rolling_windows(tokens, prefix, max_len):
    """lm-evaluation-harness's rolling windows with context_len 1, written out independently:
    the first window is [prefix] + tokens[:max_len-1]; each later one predicts up to max_len new
    tokens from the max_len tokens before them, a short last window left-filled with earlier ones."""
    first = min(max_len, len(tokens))
    windows = [([prefix] + tokens[: first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        windows.append((tokens[end - max_len - 1 : end - 1], tokens[done:end]))
        done = end
    return windows


@torch.no_grad()
def reference_nll(lm, tokens, max_len):
    total = 0.0
    for inp, tgt in rolling_windows(tokens, lm.start_id, max_len):
        logits = lm.model(input_ids=torch.tensor([inp])).logits[0, -len(tgt) :].double()
        total -= torch.log_softmax(logits, -1).gather(1, torch.tensor(tgt)[:, None]).sum().item()
    return total


@pytest.mark.parametrize("segment_len", [7, 16, 64])
def test_none_with_context_1_equals_rolling_loglikelihood(tiny_lm, segment_len):
    stream = _stream(tiny_lm)
    method = method_class("none")(tiny_lm, method_class("none").Params())
    res = evaluate(method, stream, Protocol(segment_len, 1, "document"), progress=False)
    for doc, nll in zip(stream.docs, res.doc_nll):
        assert nll == pytest.approx(reference_nll(tiny_lm, doc.ids, segment_len), rel=1e-5)


@pytest.mark.parametrize("reset", ["document", "never"])
@pytest.mark.parametrize("seg_len,ctx", [(5, 1), (8, 3), (16, 40), (3, 200)])
def test_segments_cover_each_token_once_with_the_window_before_it(tiny_lm, reset, seg_len, ctx):
    stream = _stream(tiny_lm)
    protocol = Protocol(seg_len, ctx, reset)
    start = tiny_lm.start_id
    flat = [start] + [t for d in stream.docs for t in d.ids]
    seen = {d: [] for d in range(len(stream.docs))}
    doc_begin = [1]
    for d in stream.docs:
        doc_begin.append(doc_begin[-1] + len(d.ids))
    for seg, targets, _ in segments(stream, protocol, start):
        assert seg.n == len(targets) <= seg_len
        seen[seg.doc].extend(targets.tolist())
        ids = seg.ids[0].tolist()
        # scope: the document (with its own start token) or the whole stream
        if reset == "document":
            scope = [start] + stream.docs[seg.doc].ids
            pos = 1 + seg.start  # index of the first target in scope
        else:
            scope = flat
            pos = doc_begin[seg.doc] + seg.start
        end = pos + seg.n  # one past the last target
        expected_len = min(ctx + seg_len - 1, end - 1)
        assert ids == scope[end - 1 - expected_len : end - 1]
        assert targets.tolist() == scope[pos:end]
    for d, doc in enumerate(stream.docs):
        assert seen[d] == doc.ids


def test_reset_policy_controls_context_and_method_resets(tiny_lm):
    calls = []

    class Spy(method_class("none")):
        def reset(self):
            calls.append("reset")

    stream = _stream(tiny_lm)
    for reset, n_resets in (("document", len(stream.docs)), ("never", 1)):
        calls.clear()
        res = evaluate(Spy(tiny_lm, Spy.Params()), stream, Protocol(16, 64, reset), progress=False)
        assert len(calls) == n_resets
        assert all(math.isfinite(v) for v in res.doc_nll)
    # under `never` the second document sees the first one, so its score changes
    doc_nll = {
        r: evaluate(Spy(tiny_lm, Spy.Params()), stream, Protocol(16, 64, r), progress=False).doc_nll
        for r in ("document", "never")
    }
    assert doc_nll["document"][0] == pytest.approx(doc_nll["never"][0])
    assert doc_nll["document"][1] != pytest.approx(doc_nll["never"][1])


def test_nonfinite_score_is_a_clear_error(tiny_lm):
    from tta_bench.api.errors import TTABenchError

    class Broken(method_class("none")):
        def score(self, seg):
            return torch.full((seg.n, self.lm.vocab_size), float("nan"))

    with pytest.raises(TTABenchError, match="non-finite"):
        evaluate(Broken(tiny_lm, Broken.Params()), _stream(tiny_lm), Protocol(16, 1), progress=False)
