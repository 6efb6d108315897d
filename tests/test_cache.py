"""The continuous cache against a token-by-token reference of Grave et al. 2017, and causality."""

import pytest
import torch

from tta_bench.api.task import Document
from tta_bench.protocol.stream import tokenize
from tta_bench.protocol.evaluate import Protocol, evaluate
from tta_bench.api.method import method_class
from tta_bench.prepare.prepared import PrepareData
from tests.conftest import SAMPLE


pytestmark = pytest.mark.usefixtures("one_thread")


def _stream(lm, texts, split="test"):
    return tokenize([Document(f"{split}{i}", t) for i, t in enumerate(texts)], lm.tokenizer, "text", split)


def _method(lm, name, protocol, prep_stream=None, **params):
    cls = method_class(name)
    p, errs = cls.make_params(params)
    assert not errs, errs
    m = cls(lm, p, seed=0, protocol=protocol)
    m.prepare(PrepareData("train", lambda limit_tokens=None, limit_docs=None: prep_stream, lm))
    return m


def _run(method, stream, protocol):
    out = []
    evaluate(method, stream, protocol, progress=False, observer=lambda s, lp, t: out.append((s, lp.clone(), t)))
    return out


class CacheReference:
    """The stream's history of (h_i, x_{i+1}) in order; the query at t sees the last `window` pairs
    before it, earlier positions of its own segment included (their next tokens are its inputs)."""

    def __init__(self, lm, window, theta):
        self.lm, self.window, self.theta = lm, window, theta
        self.reset()

    def reset(self):
        self.hist = []

    def p_cache(self, seg, h):
        """(n, V) float64; a row of zeros where the history is empty."""
        n = seg.n
        nxt = seg.ids[0, seg.ids.shape[1] - n + 1 :].tolist()
        p = torch.zeros(n, self.lm.vocab_size, dtype=torch.float64)
        self.pairs = 0
        for t in range(n):
            entries = (self.hist + [(h[j], nxt[j]) for j in range(t)])[-self.window :]
            self.pairs += len(entries)
            if not entries:
                continue
            s = self.theta * torch.stack([e for e, _ in entries]) @ h[t]
            w = torch.exp(s - s.max())
            for (_, tok), wj in zip(entries, (w / w.sum()).tolist()):
                p[t, tok] += wj
        return p

    def add(self, h, targets):
        self.hist += list(zip(h, targets.tolist()))


@torch.no_grad()
def ref_lm(lm, ids, n):
    out = lm.model(input_ids=ids, output_hidden_states=True)
    return torch.log_softmax(out.logits[0, -n:].double(), -1), out.hidden_states[-1][0, -n:].double()


@pytest.mark.parametrize("window,theta,reset", [(5, 0.5, "document"), (40, 0.2, "never"), (1000, 1.0, "document")])
def test_cache_equals_bruteforce(tiny_lm, window, theta, reset):
    lm, protocol = tiny_lm, Protocol(16, 8, reset)
    m = _method(lm, "cache", protocol, window=window, theta=theta, lam=0.2)
    ref = CacheReference(lm, window, theta)
    lm.ledger.extra.clear()
    worst, pairs = 0.0, 0
    for i, (seg, lp, targets) in enumerate(_run(m, _stream(lm, SAMPLE), protocol)):
        if i == 0 or (reset == "document" and seg.start == 0):
            ref.reset()
        lp_lm, h = ref_lm(lm, seg.ids, seg.n)
        p_cache = ref.p_cache(seg, h)
        pairs += ref.pairs
        ref.add(h, targets)
        has = p_cache.sum(1, keepdim=True) > 0
        want = torch.where(has, torch.log(0.8 * lp_lm.exp() + 0.2 * p_cache), lp_lm)
        worst = max(worst, (lp.double() - want).abs().max().item())
        assert torch.logsumexp(lp.double(), -1).abs().max() < 1e-5  # normalised
    assert worst < 1e-5
    assert lm.ledger.extra["search.cache"] == pairs * lm.hidden_size  # one dot product per (query, entry)


@pytest.mark.parametrize(
    "name,params",
    [
        ("cache", {"window": 50}),
        ("knn-cache", {"k": 8, "online": True, "window": 50, "index": "exact"}),
    ],
)
@pytest.mark.parametrize("reset", ["document", "never"])
def test_causal(tiny_lm, name, params, reset):
    """Changing the stream from position p on leaves every earlier log-probability unchanged, while
    later ones (inside p's segment and after) do change."""
    lm, protocol = tiny_lm, Protocol(16, 8, reset)
    train = _stream(lm, [t[::-1] for t in SAMPLE], "train")
    a = _stream(lm, SAMPLE[:2])
    b = _stream(lm, SAMPLE[:2])
    cut = 21  # inside the second segment of the first document
    b.docs[0].ids = b.docs[0].ids[:cut] + [(t + 7) % 256 for t in b.docs[0].ids[cut:]]
    ra = _run(_method(lm, name, protocol, train, **params), a, protocol)
    rb = _run(_method(lm, name, protocol, train, **params), b, protocol)
    before = after = 0
    for (sa, la, _), (sb, lb, _) in zip(ra, rb):
        for j in range(sa.n):
            if sa.doc == 0 and sa.start + j < cut:
                assert torch.equal(la[j], lb[j]), (sa.start, j)
                before += 1
            elif sa.doc == 0 and (la[j] - lb[j]).abs().max() > 1e-4:
                after += 1
    assert before == cut and after > 0


def test_reset_document_clears_cache_never_keeps_it(tiny_lm):
    """The first token of a later document: under reset=document it is scored by the bare model
    (empty cache); under never the cache of the earlier documents takes part."""
    out = {}
    for reset in ("document", "never"):
        protocol = Protocol(16, 8, reset)
        segs = _run(_method(tiny_lm, "cache", protocol, window=100, lam=0.5), _stream(tiny_lm, SAMPLE[:2]), protocol)
        seg, lp, _ = next(s for s in segs if s[0].doc == 1)
        out[reset] = (lp[0], torch.log_softmax(tiny_lm.model(input_ids=seg.ids).logits[0, -seg.n], -1))
    lp_doc, bare_doc = out["document"]
    lp_never, bare_never = out["never"]
    assert (lp_doc - bare_doc).abs().max() < 1e-5
    assert (lp_never - bare_never).abs().max() > 1e-3


@pytest.mark.parametrize(
    "params,message", [({"window": 0}, "window"), ({"lam": 1.0}, "lam"), ({"theta": -1.0}, "theta")]
)
def test_bad_params_are_refused(params, message):
    _, errs = method_class("cache").make_params(params)
    assert errs and message in errs[0]
