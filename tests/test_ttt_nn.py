"""Test-time training on nearest neighbours (`ttt-nn`) against a naive loop written independently (keys
from the model's own forward, distances in numpy, torch.optim.SGD steps on a copy: score a segment,
retrieve with the scored text, step, go on), its control `ttt-random`, their costs and roles."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.test_dynamic_eval import in_float64, windows
from tta_bench.api.method import method_class
from tta_bench.api.registry import discover
from tta_bench.api.task import Document
from tta_bench.prepare.prepared import PrepareData
from tta_bench.protocol.evaluate import Protocol, evaluate
from tta_bench.protocol.flops import Ledger
from tta_bench.protocol.models import load_model
from tta_bench.protocol.stream import tokenize

pytestmark = pytest.mark.usefixtures("one_thread")

S, C, CHUNK = 16, 8, 8
TEST = ["Test-time training steps on the prepare split's nearest chunks after scoring. " * 2, "A second one, short."]
PREP = [
    "the quick brown fox jumps over the lazy dog while the cat sleeps ",
    "numbers 0123456789 and more numbers 9876543210 in a row for keys ",
    "training data of another kind: words, words, words, and punctuation!",
    "Fine-tuning on the neighbours of the scored text: test-time training.",
]
PREP = [t[: len(t) // CHUNK * CHUNK] for t in PREP]  # whole chunks only (ASCII: one token per character)


@pytest.fixture()
def lm():
    return load_model("tiny", device="cpu")


def _stream(lm, texts, split):
    return tokenize([Document(f"{split}{i}", t) for i, t in enumerate(texts)], lm.tokenizer, "t", split)


def _method(lm, name, protocol, seed=0, **values):
    discover()
    cls = method_class(name)
    params, errs = cls.make_params({"chunk_len": CHUNK, "datastore_tokens": None, **values})
    assert not errs, errs
    lm.ledger = Ledger(lm.fingerprint)
    m = cls(lm, params, seed=seed, protocol=protocol)
    prep = _stream(lm, PREP, "train")
    with lm.ledger.paused():
        m.prepare(PrepareData("train", lambda limit_tokens=None, limit_docs=None: prep, lm))
    return m


def _run(method, stream, protocol):
    seen = []
    evaluate(method, stream, protocol, progress=False, observer=lambda seg, lp, t: seen.append(lp.clone()))
    return seen


def naive_keys(model, lm, prep_ids, n_chunks_of):
    """Every chunk's key by hand: the base model's final hidden states at the rows predicting its
    tokens (read with the protocol's windows), averaged; and each chunk's (inputs, targets)."""
    keys, chunks = [], []
    for ids in prep_ids:
        rows = []
        for inp, targets in windows(ids, lm.start_id, -(-len(ids) // S)):
            with torch.no_grad():
                out = model(input_ids=inp, output_hidden_states=True)
            rows.append(out.hidden_states[-1][0, -len(targets) :])
        rows = torch.cat(rows)
        x = torch.tensor([lm.start_id] + ids)
        for s in range(0, len(ids), CHUNK):
            e = min(s + CHUNK, len(ids))
            keys.append(rows[s:e].double().mean(0).numpy())
            chunks.append((x[s:e][None], x[s + 1 : e + 1]))
    return np.stack(keys), chunks


def naive_loop(lm, base, k, lr, self_step, test_docs, adapted=lambda name: True):
    """Score a segment with the adapted copy, embed the scored segment with the base model, step on
    the k nearest chunks (numpy distances), nearest first; per document from the base weights."""
    keys, chunks = naive_keys(base, lm, [d.ids for d in _stream(lm, PREP, "train").docs], CHUNK)
    out = []
    for doc in test_docs:
        model = copy.deepcopy(base)
        params = [p.requires_grad_(True) for name, p in model.named_parameters() if adapted(name)]
        opt = torch.optim.SGD(params, lr=lr)
        for ids, targets in windows(doc.ids, lm.start_id, -(-len(doc.ids) // S)):
            n = len(targets)
            with torch.no_grad():
                out.append(F.log_softmax(model(input_ids=ids).logits[0, -n:].float(), -1))
                q = base(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -n:].double().mean(0).numpy()
            order = np.argsort(((keys - q) ** 2).sum(1), kind="stable")[:k]
            steps = [chunks[i] for i in order] + ([(ids, targets)] if self_step else [])
            for inp, tg in steps:
                opt.zero_grad()
                F.cross_entropy(model(input_ids=inp).logits[0, -len(tg) :].float(), tg).backward()
                opt.step()
    return out


@pytest.mark.parametrize("params,self_step", [("all", False), ("last 1", True)])
def test_ttt_nn_equals_a_naive_score_retrieve_step_loop(lm, params, self_step):
    in_float64(lm)
    protocol = Protocol(S, C, "document")
    stream = _stream(lm, TEST, "test")
    base = copy.deepcopy(lm.model)
    k, lr = 3, 0.05
    method = _method(lm, "ttt-nn", protocol, k=k, lr=lr, params=params, self_step=self_step)
    got = _run(method, stream, protocol)
    method.close()
    adapted = (lambda name: True) if params == "all" else (lambda name: name.startswith("model.layers.1."))
    want = naive_loop(lm, base, k, lr, self_step, stream.docs, adapted)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() < 1e-6
    with torch.no_grad():
        static = [
            F.log_softmax(base(input_ids=ids).logits[0, -len(t) :].float(), -1)
            for ids, t in windows(stream.docs[0].ids, lm.start_id, 2)
        ]
    assert (got[0] - static[0]).abs().max().item() < 1e-6  # a document's first segment: the base model
    assert (got[1] - static[1]).abs().max().item() > 1e-2  # then an effect 10^4 times the tolerance


def test_ttt_random_takes_as_many_steps_on_seeded_draws_and_documents_are_independent(lm):
    protocol = Protocol(S, C, "document")
    stream = _stream(lm, TEST, "test")
    flops, scores = {}, {}
    for name, seed in (("ttt-nn", 0), ("ttt-random", 0), ("ttt-random", 1)):
        m = _method(lm, name, protocol, seed=seed, k=3, lr=0.05)
        scores[name, seed] = torch.cat(_run(m, stream, protocol))
        m.close()
        flops[name, seed] = lm.ledger.resolve()["flops"]
    n_segments = sum(-(-len(d.ids) // S) for d in stream.docs)
    numel = sum(p.numel() for p in lm.model.parameters())
    for key in flops:  # k steps after every scored segment, one multiply-add per weight each
        assert flops[key]["adapt.update"] == n_segments * 3 * numel
    assert not torch.allclose(scores["ttt-random", 0], scores["ttt-nn", 0])
    assert not torch.allclose(scores["ttt-random", 0], scores["ttt-random", 1])
    again = _method(lm, "ttt-random", protocol, k=3, lr=0.05)
    assert torch.equal(torch.cat(_run(again, stream, protocol)), scores["ttt-random", 0])  # seeded
    # reset per document, draws by position in the document: the second document alone scores as after the first
    alone = torch.cat(_run(again, _stream(lm, TEST[1:], "test"), protocol))
    again.close()
    assert torch.equal(alone, scores["ttt-random", 0][-len(alone) :])


def test_costs_count_the_query_forward_and_the_search(lm):
    """With every prepare chunk of one length, ttt-nn runs ttt-random's forwards plus one query forward
    of each scored input (the base model's, so `none`'s shapes), and searches every key once per segment."""
    prep = _stream(lm, PREP, "train")
    assert all(len(d.ids) % CHUNK == 0 for d in prep.docs)
    protocol = Protocol(S, C, "document")
    stream = _stream(lm, TEST, "test")
    flops = {}
    for name in ("ttt-nn", "ttt-random", "none"):
        if name == "none":
            lm.ledger = Ledger(lm.fingerprint)
            m = method_class("none")(lm, method_class("none").make_params({})[0], protocol=protocol)
        else:
            m = _method(lm, name, protocol, k=2)
        _run(m, stream, protocol)
        m.close()
        flops[name] = lm.ledger.resolve()["flops"]
    nn, rnd, none = flops["ttt-nn"], flops["ttt-random"], flops["none"]
    assert nn["forward.body"] == rnd["forward.body"] + none["forward.body"]
    assert nn["forward.head"] == rnd["forward.head"]  # the query needs no head
    assert nn["adapt.backward"] == rnd["adapt.backward"] > 0
    n_keys = sum(len(d.ids) // CHUNK for d in prep.docs)
    d = lm.hidden_size
    n_segments = sum(-(-len(doc.ids) // S) for doc in stream.docs)
    assert nn["search.ttt"] == n_segments * n_keys * d + stream.n_tokens * d and "search.ttt" not in rnd


def test_roles_controls_and_the_shared_model_given_back(lm):
    discover()
    nn, rnd = method_class("ttt-nn"), method_class("ttt-random")
    p = nn.make_params({"k": 5, "lr": 0.01, "params": "lora"})[0]
    assert nn.adapts_at_test_time(p) and rnd.adapts_at_test_time(p)
    control = nn.control(p)
    assert control["method"] == "ttt-random" and control["params"]["k"] == 5 and control["params"]["params"] == "lora"
    assert rnd.control(rnd.make_params(control["params"])[0]) is None
    for values in ({"k": 0}, {"lr": 0}, {"params": "lora", "lora_rank": 0}, {"chunk_len": 0}, {"params": "("}):
        params, errs = nn.make_params(values)
        assert params is None and errs, values

    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    protocol = Protocol(S, C, "document")
    for params in ("lora", "all"):
        m = _method(lm, "ttt-nn", protocol, k=2, lr=0.1, params=params)
        _run(m, _stream(lm, TEST, "test"), protocol)
        m.close()
        assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
        assert not any(q.requires_grad for q in lm.model.parameters())
        assert not any(mod._forward_hooks for mod in lm.model.modules())


@pytest.mark.parametrize("params", ["lora", "all"])
def test_a_shared_pass_of_the_base_model_never_stands_in_for_the_adapted_one(lm, params):
    """With `none`'s base passes at hand (tta_bench.protocol.shared_pass) ttt-nn scores the same: the
    adapted forwards are its own; under `all` the shared model is the base, so the queries are served."""
    shared_pass = pytest.importorskip("tta_bench.protocol.shared_pass")
    protocol = Protocol(S, C, "document")
    stream = _stream(lm, TEST, "test")
    alone = _method(lm, "ttt-nn", protocol, k=2, lr=0.1, params=params)
    want = _run(alone, stream, protocol)
    alone.close()
    lm.passes = shared_pass.SharedPasses()
    none = method_class("none")(lm, method_class("none").make_params({})[0], protocol=protocol)
    _run(none, stream, protocol)
    method = _method(lm, "ttt-nn", protocol, k=2, lr=0.1, params=params)
    got = _run(method, stream, protocol)
    method.close()
    assert params == "lora" or lm.passes.hits == len(got)  # one query per scored segment
    assert all(torch.equal(a, b) for a, b in zip(got, want))
