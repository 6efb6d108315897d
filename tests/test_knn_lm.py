"""kNN-LM (and kNN-LM + cache) against brute-force references written independently: keys read from
another module, every datastore key's distance in float64, an explicit softmax and mixture."""

import json

import numpy as np
import pytest
import torch

from tta_bench.api.task import Document
from tta_bench.protocol.stream import tokenize
from tta_bench.api.errors import TTABenchError
from tta_bench.protocol.evaluate import Protocol, evaluate, segments
from tta_bench.api.method import method_class
from tta_bench.prepare.prepared import PrepareData
from tests.conftest import SAMPLE
from tests.test_cache import CacheReference

TRAIN = [t[::-1] + " extra words so the datastore has some more keys." for t in SAMPLE]


pytestmark = pytest.mark.usefixtures("one_thread")


def _stream(lm, texts, split):
    return tokenize([Document(f"{split}{i}", t) for i, t in enumerate(texts)], lm.tokenizer, "text", split)


def _method(lm, name, protocol, prep_stream, **params):
    cls = method_class(name)
    p, errs = cls.make_params(params)
    assert not errs, errs
    m = cls(lm, p, seed=0, protocol=protocol)
    data = PrepareData(prep_stream.split, lambda limit_tokens=None, limit_docs=None: prep_stream, lm)
    m.prepare(data)
    m._events = data.events  # what prepare found in the cache and what it computed
    return m


def _run(method, stream, protocol):
    out = []
    evaluate(method, stream, protocol, progress=False, observer=lambda s, lp, t: out.append((s, lp.clone(), t)))
    return out


@torch.no_grad()
def ref_forward(lm, ids, n, key):
    """(log p_lm (n, V) float64, final hidden (n, d), key (n, d)) from the full HF model; the
    feed-forward input is read as the output of the last block's post-attention norm."""
    seen = []
    handle = lm.model.model.layers[-1].post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        out = lm.model(input_ids=ids, output_hidden_states=True)
    finally:
        handle.remove()
    lp = torch.log_softmax(out.logits[0, -n:].double(), -1)
    h = out.hidden_states[-1][0, -n:].double()
    k = seen[0][0, -n:].double() if key == "ffn_input" else h
    return lp, h, k


class KnnReference:
    """Brute-force kNN-LM: distances to every key, the k smallest, softmax(-d/T), mixed with p_lm."""

    def __init__(self, lm, prep_stream, protocol, key, k, lam, temperature, online):
        self.lm, self.key, self.k, self.lam, self.t, self.online = lm, key, k, lam, temperature, online
        keys, vals = [], []
        for seg, targets, _ in segments(prep_stream, protocol, lm.start_id):
            keys.append(ref_forward(lm, seg.ids, seg.n, key)[2])
            vals.append(targets)
        self.keys, self.vals = torch.cat(keys), torch.cat(vals)
        self.reset()

    def reset(self):
        self.on_keys, self.on_vals = self.keys[:0], self.vals[:0]

    def p_knn(self, q):
        keys, vals = torch.cat([self.keys, self.on_keys]), torch.cat([self.vals, self.on_vals])
        p = torch.zeros(len(q), self.lm.vocab_size, dtype=torch.float64)
        for i in range(len(q)):
            d = ((keys - q[i]) ** 2).sum(1)
            near = torch.argsort(d)[: self.k]
            w = torch.exp(-(d[near] - d[near].min()) / self.t)
            for j, wj in zip(near.tolist(), (w / w.sum()).tolist()):
                p[i, vals[j]] += wj
        return p

    def score(self, seg):
        lp, h, q = ref_forward(self.lm, seg.ids, seg.n, self.key)
        self._q = q
        return torch.log((1 - self.lam) * lp.exp() + self.lam * self.p_knn(q)), h

    def adapt(self, targets):
        if self.online:
            self.on_keys, self.on_vals = torch.cat([self.on_keys, self._q]), torch.cat([self.on_vals, targets])


@pytest.mark.parametrize(
    "key,reset,online,k,temperature",
    [
        ("ffn_input", "document", False, 8, 1.0),
        ("hidden", "never", True, 5, 3.0),
        ("ffn_input", "document", True, 10_000, 1.0),  # k beyond the datastore: every key is a neighbour
    ],
)
def test_knn_equals_bruteforce(tiny_lm, key, reset, online, k, temperature):
    lm, protocol = tiny_lm, Protocol(16, 8, reset)
    test, train = _stream(lm, SAMPLE[:3], "test"), _stream(lm, TRAIN, "train")
    m = _method(
        lm, "knn-lm", protocol, train, key=key, online=online, k=k, temperature=temperature, lam=0.3, index="exact"
    )
    ref = KnnReference(lm, train, protocol, key, k, 0.3, temperature, online)
    assert m.knn.info["n_keys"] == train.n_tokens == len(ref.vals)
    worst = 0.0
    for i, (seg, lp, targets) in enumerate(_run(m, test, protocol)):
        if i == 0 or (reset == "document" and seg.start == 0):
            ref.reset()
        want, _ = ref.score(seg)
        ref.adapt(targets)
        worst = max(worst, (lp.double() - want).abs().max().item())
        assert torch.logsumexp(lp.double(), -1).abs().max() < 1e-5  # normalised
    assert worst < 1e-5


def test_knn_cache_equals_sequential_mixture(tiny_lm):
    """kNN-LM + cache: the cache mixed into the kNN-LM distribution, each by its own reference."""
    lm, protocol = tiny_lm, Protocol(16, 8, "document")
    test, train = _stream(lm, SAMPLE[:2], "test"), _stream(lm, TRAIN, "train")
    m = _method(lm, "knn-cache", protocol, train, k=6, lam=0.2, index="exact", window=20, theta=0.5, cache_lam=0.15)
    knn = KnnReference(lm, train, protocol, "ffn_input", 6, 0.2, 1.0, False)
    cache = CacheReference(lm, window=20, theta=0.5)
    worst = 0.0
    for seg, lp, targets in _run(m, test, protocol):
        if seg.start == 0:
            cache.reset()
        lp_knn, h = knn.score(seg)
        p_cache = cache.p_cache(seg, h)
        has = p_cache.sum(1, keepdim=True) > 0
        want = torch.where(has, torch.log(0.85 * lp_knn.exp() + 0.15 * p_cache), lp_knn)
        cache.add(h, targets)
        worst = max(worst, (lp.double() - want).abs().max().item())
    assert worst < 1e-5


def test_ivfpq_full_probe_with_reranking_is_exact(tmp_path):
    from tta_bench_methods.retrieval.knn import KnnIndex

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1500, 16)).astype(np.float32)
    q = rng.standard_normal((40, 16)).astype(np.float32)
    d_true = ((q[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
    want = np.argsort(d_true, 1)[:, :10]
    built = []

    def cached(params, build):  # stands in for PrepareData.cached: builds once per params
        folder = tmp_path / json.dumps(params, sort_keys=True).replace('"', "").replace(" ", "")
        if not folder.is_dir():
            folder.mkdir()
            build(folder)
            built.append(params)
        return folder

    index = KnnIndex(keys, "ivfpq", nlist=8, code_size=8, nprobe=8, rerank=8, cached=cached)
    dist, ids = index.search(q, 10)
    assert (ids == want).all()
    np.testing.assert_allclose(dist, np.take_along_axis(d_true, want, 1), rtol=1e-4)
    # the trained index is taken from the cache the second time
    assert (
        KnnIndex(keys, "ivfpq", nlist=8, code_size=8, nprobe=8, rerank=8, cached=cached).search(q, 10)[1] == ids
    ).all()
    assert len(built) == 1
    # without re-ranking, PQ distances are approximate: not the exact ones
    pq_dist, _ = KnnIndex(keys, "ivfpq", nlist=8, code_size=8, nprobe=8, rerank=0).search(q, 10)
    assert not np.allclose(pq_dist, np.take_along_axis(d_true, want, 1), rtol=1e-4)
    # flops: coarse quantizer + tables + every list's codes (nprobe = nlist) + exact re-ranking of 80
    assert index.flops_per_query(10) == 8 * 16 + 256 * 16 + 1500 * 8 + 80 * 16


def test_datastore_comes_from_the_shared_pass_and_is_reused(tiny_lm, monkeypatch):
    """The keys are the pass's features, values the prepare stream's tokens in order; a second
    method (other search settings) runs no forward; another key or protocol reads another pass."""
    from tta_bench_methods.retrieval.knn import datastore

    lm, protocol = tiny_lm, Protocol(16, 8, "document")
    train = _stream(lm, TRAIN[:2], "train")
    m = _method(lm, "knn-lm", protocol, train, k=4)
    assert m.knn.info["index"] == "exact" and m.knn.info["n_keys"] == train.n_tokens
    data = PrepareData("train", lambda **k: train, lm)
    keys, values = datastore(data, train, protocol, "ffn_input")
    assert values.tolist() == [t for d in train.docs for t in d.ids]
    want = torch.cat(
        [ref_forward(lm, seg.ids, seg.n, "ffn_input")[2] for seg, _, _ in segments(train, protocol, lm.start_id)]
    )
    assert torch.allclose(torch.from_numpy(keys).double(), want, atol=1e-5)
    calls = []
    monkeypatch.setattr(lm, "hidden", lambda *a, **k: calls.append(1))
    m2 = _method(lm, "knn-lm", protocol, train, k=4, lam=0.5)
    assert [e["hit"] for e in m2._events] == [True] and not calls
    monkeypatch.undo()
    folders = {
        _method(lm, "knn-lm", p, train, k=4, key=key)._events[0]["folder"]
        for p, key in ((protocol, "hidden"), (Protocol(8, 8, "document"), "ffn_input"))
    }
    assert len(folders | {m._events[0]["folder"]}) == 2  # the key is a column of one pass; the protocol is not


def test_search_flops_exact(tiny_lm):
    """Exact search: n_keys * d per query, plus the online part's size * d once it holds keys."""
    lm, protocol = tiny_lm, Protocol(16, 8, "never")
    test, train = _stream(lm, SAMPLE[:2], "test"), _stream(lm, TRAIN, "train")
    m = _method(lm, "knn-lm", protocol, train, k=4, index="exact", online=True)
    lm.ledger.extra.clear()
    segs = _run(m, test, protocol)
    d, n_keys = lm.hidden_size, train.n_tokens
    want, seen = 0, 0
    for seg, _, _ in segs:
        want += seg.n * (n_keys + seen) * d
        seen += seg.n
    assert lm.ledger.extra["search.knn"] == want


def test_finds_last_feed_forward_or_fails_clearly(tiny_lm):
    import copy

    from tta_bench_methods.retrieval.knn import KeyReader

    name, mod = tiny_lm.last_ffn()
    assert mod is tiny_lm.model.model.layers[-1].mlp and name == "model.layers.1.mlp"
    plain = copy.copy(tiny_lm)
    plain.model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(TTABenchError, match="key: hidden"):
        KeyReader(plain, "ffn_input")


@pytest.mark.parametrize(
    "params,message",
    [
        ({"lam": 1.0}, "lam"),
        ({"k": 0}, "k must"),
        ({"temperature": 0.0}, "temperature"),
        ({"rerank": -1}, "rerank"),
    ],
)
def test_bad_params_are_refused(params, message):
    _, errs = method_class("knn-lm").make_params(params)
    assert errs and message in errs[0]


def test_code_size_must_divide_key_dimension(tiny_lm):
    lm, protocol = tiny_lm, Protocol(16, 8, "document")
    with pytest.raises(TTABenchError, match="code_size"):
        _method(lm, "knn-lm", protocol, _stream(lm, TRAIN, "train"), index="ivfpq", nlist=2, code_size=7)


@pytest.mark.slow
def test_smollm2_key_is_last_feed_forward_input():
    """On the real model the hook finds model.layers[-1].mlp, and its input is the last block's
    post-attention norm output (read here by another hook)."""
    from tta_bench.protocol.models import load_model
    from tta_bench_methods.retrieval.knn import KeyReader

    lm = load_model("smollm2-135m", device="cpu")
    reader = KeyReader(lm, "ffn_input")
    assert lm.last_ffn()[1] is lm.model.model.layers[-1].mlp
    ids = torch.tensor([lm.tokenizer.encode(" = Valkyria Chronicles III = \n Senjō no Valkyria 3 is a game")[0]])
    h, key = reader(ids, 5)
    _, h_ref, k_ref = ref_forward(lm, ids, 5, "ffn_input")
    assert torch.allclose(key.double(), k_ref, atol=1e-4) and torch.allclose(h.double(), h_ref, atol=1e-4)
