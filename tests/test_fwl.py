"""Fast Weight Layers: the exact identity with one explicit SGD step, chunking and streaming,
second-order meta-gradients, meta-learning on a synthetic recall task, checkpoints, and the method."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tta_bench_methods.fwl.block import FAST, FWBlock, FWLConfig, FWStream, commit_pass, score_pass
from tta_bench_methods.fwl.train import TrainConfig, load_checkpoint, save_checkpoint
from tta_bench.api.task import Document
from tta_bench.protocol.stream import tokenize
from tta_bench.protocol.evaluate import Protocol, evaluate, segments
from tta_bench.protocol.flops import Ledger

D, M, V, T = 6, 5, 11, 13


pytestmark = pytest.mark.usefixtures("one_thread")


def random_block(seed=0, dtype=torch.float64, norm=1 / 8, **cfg):
    """A block (FWLConfig options in cfg) whose every parameter is random and O(1), so each term of the
    update matters; learned decays stay at their timescales."""
    torch.manual_seed(seed)
    block = FWBlock(FWLConfig(D, M, V, norm, **cfg)).to(dtype)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name != "decay_logit":
                p.copy_(torch.randn_like(p))
        for k in FAST:  # distinct positive step sizes, large enough that the step changes the logits a lot
            block.eta[k].copy_(torch.rand(block.eta[k].shape) * 2 + 0.5)
    return block


def slow_forward(params, x, base, eps):
    """The block from its definition, with plain torch ops: x (T, d) -> logits (T, V)."""
    h1 = x @ params["w1"].T + params["b1"]
    h2 = F.relu(h1).square() @ params["w2"].T + params["b2"]
    z = F.layer_norm(h2, (h2.shape[-1],), params["alpha"], params["beta"], eps)
    out = z @ params["U"].T
    return out if base is None else out + base


def block_params(block) -> dict:
    """The slow block's parameters by the names the explicit references use."""
    return {
        "w1": block.dense1.weight,
        "b1": block.dense1.bias,
        "w2": block.dense2.weight,
        "b2": block.dense2.bias,
        "alpha": block.ln_alpha,
        "beta": block.ln_beta,
        "U": block.unembed.weight,
    }


def explicit_sgd_logits(block, x, y, base, create_graph=False):
    """Position i's logits from the slow block after one SGD step (step sizes as learning rates) on
    c * sum_{j<i} CE_j, by autograd; x (T, d), y (T,), base (T, V) or None."""
    params = block_params(block)
    fast = [k for k in params if k != "U"]
    c, out = block.cfg.norm, []
    for i in range(len(x)):
        if i == 0:
            stepped = params
        else:
            logits = slow_forward(params, x[:i], None if base is None else base[:i], block.cfg.eps)
            loss = c * F.cross_entropy(logits, y[:i], reduction="sum")
            grads = torch.autograd.grad(loss, [params[k] for k in fast], create_graph=create_graph)
            stepped = {**params, **{k: params[k] - block.eta[k] * g for k, g in zip(fast, grads)}}
        out.append(slow_forward(stepped, x[i : i + 1], None if base is None else base[i : i + 1], block.cfg.eps)[0])
    return torch.stack(out)


def data(seed=1, with_base=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (T,), generator=g)
    base = 3 * torch.randn(T, V, generator=g, dtype=torch.float64) if with_base else None
    return x, y, base


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("chunk", [T, 4, 1])
def test_fast_logits_equal_explicit_sgd_step(with_base, chunk):
    block = random_block()
    x, y, base = data(with_base=with_base)
    want = explicit_sgd_logits(block, x, y, base)
    got, _ = block(x[None], y[None], None if base is None else base[None], chunk=chunk)
    assert rel_err(got[0], want) < 1e-5
    # the step changes the logits far beyond the tolerance, so the identity is not trivially met
    slow = slow_forward(
        block_params(block),
        x,
        base,
        block.cfg.eps,
    )
    assert rel_err(slow[1:], want[1:]) > 1e-2
    assert torch.allclose(got[0, 0], slow[0], rtol=0, atol=1e-12)  # position 0 has no earlier token


def test_chunking_and_state_agree():
    block = random_block()
    x, y, base = data()
    one, s_one = block(x[None], y[None], base[None], chunk=T)
    for chunk in (1, 3, 5):
        many, s_many = block(x[None], y[None], base[None], chunk=chunk)
        assert rel_err(many, one) < 1e-12
        for a, b in zip(s_many, s_one):
            assert rel_err(a, b) < 1e-12
    # the carried state is the summed per-position gradient of every fast parameter: check it by autograd
    params = block_params(block)
    loss = block.cfg.norm * F.cross_entropy(slow_forward(params, x, base, block.cfg.eps), y, reduction="sum")
    grads = torch.autograd.grad(loss, [params[k] for k in FAST])
    for k, g, s in zip(FAST, grads, s_one):
        assert rel_err(s[0], g) < 1e-10, k


def test_streamed_state_equals_one_shot():
    """Segments through FWStream (targets of a segment's last position committed afterwards) equal one pass."""
    block = random_block()
    x, y, base = data()
    one, _ = block(x[None], y[None], base[None], chunk=4)
    stream = FWStream(block, chunk=3)
    outs = []
    for a, b in ((0, 5), (5, 6), (6, 13)):
        outs.append(stream.segment_logits(x[None, a:b], base[None, a:b], y[None, a : b - 1]))
        stream.commit(y[None, b - 1 : b])
    assert rel_err(torch.cat(outs, 1), one) < 1e-12
    stream.reset()
    again = stream.segment_logits(x[None, :5], base[None, :5], y[None, :4])
    assert rel_err(again, one[:, :5]) < 1e-12


def test_batch_rows_are_independent():
    block = random_block()
    x, y, base = data()
    x2, y2, base2 = data(seed=2)
    both, _ = block(torch.stack([x, x2]), torch.stack([y, y2]), torch.stack([base, base2]), chunk=4)
    alone, _ = block(x2[None], y2[None], base2[None], chunk=4)
    assert rel_err(both[1], alone[0]) < 1e-12


def test_meta_gradient_includes_second_order_terms():
    """d(loss of the fast logits)/d(parameters and step sizes) equals autograd through the explicit
    SGD step with create_graph=True (second-order terms included)."""
    block = random_block(seed=3)
    x, y, base = data(seed=4)
    got, _ = block(x[None], y[None], base[None], chunk=4)
    want = explicit_sgd_logits(block, x, y, base, create_graph=True)
    params = list(block.parameters())
    g_got = torch.autograd.grad(F.cross_entropy(got[0], y), params)
    g_want = torch.autograd.grad(F.cross_entropy(want, y), params)
    names = [n for n, _ in block.named_parameters()]
    for name, a, b in zip(names, g_got, g_want):
        assert rel_err(a, b) < 1e-8, name
    # and the second-order part is not negligible: cutting the graph at the inner gradient changes it
    acts = block.slow(x[None])
    gl = block.output_grad(block.logits(acts.z, base[None]), y[None])
    grads = block.inner_grads(acts, gl)
    z, _ = block.fast(x[None], acts, type(grads)(*(g.detach() for g in grads)), None, 4)
    g_first = torch.autograd.grad(F.cross_entropy(block.logits(z, base[None])[0], y), block.dense1.weight)[0]
    assert rel_err(g_first, g_want[names.index("dense1.weight")]) > 1e-3


def test_unknown_targets_give_no_gradient():
    block = random_block()
    x, y, base = data()
    masked = y.clone()
    masked[7:] = -1
    got, _ = block(x[None], masked[None], base[None])
    want, _ = block(x[None, :8], y[None, :8], base[None, :8])  # positions <= 7 only use targets j < 7
    assert rel_err(got[0, :8], want[0]) < 1e-12


# -- meta-learning ----------------------------------------------------------------------------------
def recall_batch(g, batch, keys=16, values=16, pairs=6):
    """Random key-value pairs, then the same pairs again in another order: a query key's value is
    predictable only from the first half of its own sequence."""
    k = torch.stack([torch.randperm(keys, generator=g)[:pairs] for _ in range(batch)])
    v = torch.randint(keys, keys + values, (batch, pairs), generator=g)
    perm = torch.stack([torch.randperm(pairs, generator=g) for _ in range(batch)])
    seq = torch.cat(
        [
            torch.stack([k, v], -1).reshape(batch, -1),
            torch.stack([k.gather(1, perm), v.gather(1, perm)], -1).reshape(batch, -1),
        ],
        1,
    )
    query = torch.zeros(batch, 4 * pairs - 1, dtype=torch.bool)
    query[:, 2 * pairs :: 2] = True  # inputs: the repeated keys; targets: their values
    return seq[:, :-1], seq[:, 1:], query


def train_recall(learn_steps: bool, steps=60, keys=16, values=16, pairs=6, d=16):
    """An FWL head from scratch (no base logits) over fixed random token embeddings; returns the NLL
    of the queried values on fresh sequences."""
    torch.manual_seed(0)
    emb = torch.randn(keys + values, d)
    block = FWBlock(FWLConfig(d, 16, keys + values, 1 / (4 * pairs)))
    groups = [{"params": [p for _, p in block.slow_parameters()], "lr": 1e-2}]
    if learn_steps:
        groups.append({"params": list(block.eta.parameters()), "lr": 5e-2})
    else:
        with torch.no_grad():
            for p in block.eta.parameters():
                p.zero_()
    opt = torch.optim.Adam(groups)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        inp, tgt, _ = recall_batch(g, 16, keys, values, pairs)
        logits, _ = block(emb[inp], tgt, None, chunk=8)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    inp, tgt, query = recall_batch(torch.Generator().manual_seed(99), 256, keys, values, pairs)
    with torch.no_grad():
        logits, _ = block(emb[inp], tgt, None, chunk=8)
    return F.cross_entropy(logits[query], tgt[query]).item()


def test_meta_learned_fwl_solves_recall_that_frozen_step_sizes_cannot():
    import math

    fwl, frozen = train_recall(True), train_recall(False)
    # without fast weights the value is a guess among 16 (ln 16 = 2.77 nats); with them it is recalled
    assert frozen > 0.9 * math.log(16)
    assert fwl < 0.25 * frozen


# -- the method on the tiny model ----------------------------------------------------------------------
from tta_bench.api.method import method_class  # noqa: E402
from tta_bench.prepare.prepared import PrepareData  # noqa: E402
from tta_bench.api.registry import discover  # noqa: E402

TEXT = [
    "Fast weights remember: the zebra ate the kiwi, and later the zebra ate the kiwi again. " * 2,
    "A second, shorter document about kiwi and zebra.\n",
]
PREP = ["Training text for the block; words repeat, words repeat, and the block learns to copy them. " * 4]


def stream_of(lm, texts, split="test"):
    return tokenize([Document(f"d{i}", t) for i, t in enumerate(texts)], lm.tokenizer, "t", split)


def make(lm, name="fwl", protocol=None, **values):
    """A prepared method with its quick parameters (and `values`) on the PREP text."""
    discover()
    cls = method_class(name)
    params, errs = cls.make_params({**cls.quick_params, **values})
    assert not errs, errs
    lm.ledger = Ledger(lm.fingerprint)
    method = cls(lm, params, protocol=protocol)
    data = PrepareData(
        "train",
        lambda limit_tokens=None, limit_docs=None: tokenize(
            [Document("p", t) for t in PREP], lm.tokenizer, "t", "train", limit_docs, limit_tokens
        ),
        lm,
    )
    method.prepare(data)
    method._events = data.events  # what prepare found in the cache and what it built
    return method


def run(method, stream, protocol):
    seen = []
    evaluate(method, stream, protocol, progress=False, observer=lambda seg, lp, t: seen.append((seg.doc, lp.clone())))
    return seen


@torch.no_grad()
def test_document_fast_state_equals_one_pass_over_each_document(tiny_lm):
    """Streaming with the state carried across segments (context_len 8: context positions must not be
    counted twice) equals one forward of the block over each document's scored positions."""
    protocol = Protocol(16, 8, "document")
    method = make(tiny_lm, protocol=protocol, fast_state="document")
    stream = stream_of(tiny_lm, TEXT)
    seen = run(method, stream, protocol)
    block = method.block
    for d in range(len(stream.docs)):
        xs, ys = [], []
        for seg, targets, _ in segments(stream, protocol, tiny_lm.start_id):
            if seg.doc == d:
                xs.append(tiny_lm.hidden(seg.ids)[0, -seg.n :])
                ys.append(targets)
        x, y = torch.cat(xs)[None], torch.cat(ys)[None]
        want = torch.log_softmax(block(x, y, tiny_lm.logits(x), chunk=5)[0][0], -1)
        got = torch.cat([lp for doc, lp in seen if doc == d])
        assert (got - want).abs().max() < 1e-4
        assert (got - torch.log_softmax(tiny_lm.logits(x)[0], -1)).abs().max() > 1e-3  # the block matters


@torch.no_grad()
def test_window_fast_state_equals_explicit_sgd_step_on_the_window(tiny_lm):
    protocol = Protocol(16, 8, "document")
    method = make(tiny_lm, protocol=protocol, fast_state="window")
    stream = stream_of(tiny_lm, TEXT[:1])
    seen = run(method, stream, protocol)
    block = copy.deepcopy(method.block).double().requires_grad_(True)
    for k in (0, 2):
        seg, targets, _ = list(segments(stream, protocol, tiny_lm.start_id))[k]
        h = tiny_lm.hidden(seg.ids)[0].double()
        base = tiny_lm.logits(tiny_lm.hidden(seg.ids))[0].double()
        y = torch.cat([seg.ids[0, 1:], targets[-1:]])
        with torch.enable_grad():
            want = explicit_sgd_logits(block, h, y, base)[-seg.n :]
        assert (seen[k][1].double() - torch.log_softmax(want, -1)).abs().max() < 1e-4


@torch.no_grad()
def test_document_fast_state_is_causal_and_resets(tiny_lm):
    protocol = Protocol(16, 8, "document")
    method = make(tiny_lm, protocol=protocol, fast_state="document")
    base = run(method, stream_of(tiny_lm, TEXT), protocol)
    ids = stream_of(tiny_lm, TEXT).docs[0].ids
    t = 37  # inside the third segment
    changed = TEXT[0][:t] + "".join("#" if c != "#" else "$" for c in TEXT[0][t:])
    assert stream_of(tiny_lm, [changed]).docs[0].ids[:t] == ids[:t]
    pert = run(method, stream_of(tiny_lm, [changed, TEXT[1]]), protocol)
    a = torch.cat([lp for d, lp in base if d == 0])
    b = torch.cat([lp for d, lp in pert if d == 0])
    assert (a[:t] - b[:t]).abs().max() < 1e-5
    assert (a[t + 1 :] - b[t + 1 :]).abs().max() > 1e-3
    # reset=document: the second document is scored as if it were alone
    alone = run(method, stream_of(tiny_lm, TEXT[1:]), protocol)
    assert (torch.cat([lp for d, lp in pert if d == 1]) - torch.cat([lp for _, lp in alone])).abs().max() < 1e-5


# -- checkpoints and the harness's cache of prepared state -------------------------------------------
def test_trained_block_is_cached_and_found_again(tiny_lm, tmp_path, monkeypatch):
    """prepare trains once: the checkpoint lands in the harness's cache (keyed by model, data and the
    training settings), round-trips exactly, and a second method with the same settings loads it."""
    import tta_bench_methods.fwl.method as fwl_method

    monkeypatch.setenv("TTA_BENCH_CACHE", str(tmp_path / "cache"))
    first = make(tiny_lm, train_steps=3, eval_every=2)
    event = next(e for e in first._events if e["kind"] == "fwl-block")
    folder = Path(event["folder"])
    assert not event["hit"] and folder.parent == tmp_path / "cache" / "prepared" / "fwl-block"
    assert first.info["train_seconds"] > 0 and first.info["history"] and first.info["train"]["train_steps"] == 3
    x = torch.randn(1, 9, tiny_lm.hidden_size)
    y = torch.randint(0, tiny_lm.vocab_size, (1, 9))
    base_logits = torch.randn(1, 9, tiny_lm.vocab_size)
    loaded, _, info = load_checkpoint(folder / "block.safetensors")
    assert torch.equal(loaded(x, y, base_logits)[0], first.block(x, y, base_logits)[0]) and info == first.info
    monkeypatch.setattr(fwl_method, "train_block", lambda *a, **k: pytest.fail("retrained a cached block"))
    again = make(tiny_lm, train_steps=3, eval_every=2)
    assert [e["hit"] for e in again._events if e["kind"] == "fwl-block"] == [True]
    assert torch.equal(again.block.unembed.weight, first.block.unembed.weight)
    monkeypatch.undo()
    monkeypatch.setenv("TTA_BENCH_CACHE", str(tmp_path / "cache"))
    other = make(tiny_lm, train_steps=3, eval_every=2, lr=2e-3)  # another setting: another folder
    assert next(e for e in other._events if e["kind"] == "fwl-block")["folder"] != str(folder)


def test_checkpoint_of_another_model_is_refused(tiny_lm, tmp_path):
    from tta_bench.api.errors import TTABenchError

    block = FWBlock(FWLConfig(tiny_lm.hidden_size, 4, tiny_lm.vocab_size, 0.1))
    save_checkpoint(
        tmp_path / "b.safetensors",
        block,
        {},
        {"model": "someothermodel", "model_name": "other"},
        np.zeros(0, np.uint64),
    )
    with pytest.raises(TTABenchError, match="trained on model other"):
        make(tiny_lm, checkpoint=str(tmp_path / "b.safetensors"))
    (tmp_path / "c.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        load_checkpoint(tmp_path / "c.safetensors")
    with pytest.raises(TTABenchError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


# -- FLOPs ------------------------------------------------------------------------------------------
def test_fvcore_breakdown_matches_closed_form():
    """Scoring n positions: three vocabulary projections (slow logits, the inner gradient, fast logits),
    five dense products (two slow, W2's backward, two fast), the state update, and the causal products
    inside each chunk (computed in full, the mask applied after)."""
    from fvcore.nn import FlopCountAnalysis

    d, m, v, n, chunk = 12, 4, 50, 10, 4
    block = FWBlock(FWLConfig(d, m, v, 0.1))
    x, base = torch.randn(1, n, d), torch.randn(1, n, v)
    state = block.zero_state(1, x)
    analysis = FlopCountAnalysis(
        score_pass(block, chunk, True), (x, base, torch.zeros(1, n - 1, dtype=torch.long), *state)
    )
    analysis.unsupported_ops_warnings(False)
    analysis.tracer_warnings("none")
    by = analysis.by_module()
    sizes = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    assert by["block.op_vocab"] == 3 * n * v * m
    assert by["block.op_dense"] == n * (2 * (d * 4 * m + 4 * m * m) + 4 * m * m)
    assert by["block.op_state"] == n * (4 * m * d + m * 4 * m)
    assert by["block.op_attn"] == sum(c * c * (d + 4 * m) + c * c * (4 * m + m) for c in sizes)
    assert analysis.total() == sum(
        by[k] for k in ("block.op_vocab", "block.op_dense", "block.op_state", "block.op_attn")
    )
    commit = FlopCountAnalysis(commit_pass(block), (x[:, :1], base[:, :1], torch.zeros(1, 1, dtype=torch.long), *state))
    commit.unsupported_ops_warnings(False)
    assert commit.by_module()["block.op_vocab"] == v * m  # the last position's inner gradient


def test_method_records_fwl_flops(tiny_lm):
    protocol = Protocol(16, 8, "document")
    method = make(tiny_lm, protocol=protocol, fast_state="document")
    run(method, stream_of(tiny_lm, TEXT[:1]), protocol)
    flops = tiny_lm.ledger.resolve()["flops"]
    assert flops["forward.fwl.score"] > 0 and flops["forward.fwl.commit"] > 0 and flops["forward.head"] > 0


# -- FWL + dynamic evaluation ----------------------------------------------------------------------
def test_fwl_dynamic_eval_equals_naive_sgd_loop(tiny_lm):
    """fast_state=window, SGD over the block's weights: three segments equal an explicit loop with
    torch.optim.SGD on each scored segment's mean NLL."""
    protocol = Protocol(16, 8, "document")
    lr = 0.05
    method = make(tiny_lm, "fwl-dynamic-eval", protocol=protocol, fast_state="window", dyn_lr=lr)
    start = copy.deepcopy(method.block)
    stream = stream_of(tiny_lm, TEXT[:1])
    seen = run(method, stream, protocol)
    block = start.requires_grad_(True)
    opt = torch.optim.SGD([p for n, p in block.named_parameters() if not n.startswith("eta.")], lr=lr)
    for k, (seg, targets, _) in enumerate(list(segments(stream, protocol, tiny_lm.start_id))[:3]):
        with torch.no_grad():
            h = tiny_lm.hidden(seg.ids)
            base = tiny_lm.logits(h)
        y = torch.cat([seg.ids[:, 1:], torch.full((1, 1), -1)], 1)
        logprobs = torch.log_softmax(block(h, y, base)[0][0, -seg.n :], -1)
        assert (logprobs.detach() - seen[k][1]).abs().max() < 1e-5
        opt.zero_grad()
        F.nll_loss(logprobs, targets).backward()
        opt.step()
    assert (
        seen[2][1] - run(make(tiny_lm, protocol=protocol, fast_state="window"), stream, protocol)[2][1]
    ).abs().max() > 1e-4


def test_fwl_dynamic_eval_over_all_weights_gives_the_model_back():
    from tta_bench.protocol.models import load_model

    lm = load_model("tiny", device="cpu")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    protocol = Protocol(16, 8, "document")
    method = make(lm, "fwl-dynamic-eval", protocol=protocol, dyn_params="all", dyn_lr=0.01, fast_state="document")
    run(method, stream_of(lm, TEXT[:1]), protocol)
    assert any(not torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())  # it adapted the base
    flops = lm.ledger.resolve()["flops"]
    assert flops["adapt.backward"] > 0 and flops["adapt.update"] > 0
    method.close()
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in lm.model.parameters())


@torch.no_grad()
def test_top_blocks_are_fine_tuned_in_a_private_copy():
    from tta_bench.protocol.models import load_model

    lm = load_model("tiny", device="cpu")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    protocol = Protocol(16, 8, "document")
    method = make(lm, protocol=protocol, top_blocks=1, lr=1e-2, fast_state="document")
    # training changed the last block only, in the method's copy; the shared model is as it was
    changed = {k for k, v in method.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".layers.1." in k for k in changed)
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in lm.model.parameters())
    stream = stream_of(lm, TEXT[:1])
    seen = run(method, stream, protocol)
    seg, targets, _ = next(segments(stream, protocol, lm.start_id))
    x = method.model.base_model(input_ids=seg.ids).last_hidden_state[:, -seg.n :]
    want = torch.log_softmax(method.block(x, targets[None], lm.logits(x))[0][0], -1)
    assert (seen[0][1] - want).abs().max() < 1e-4
    x0 = lm.hidden(seg.ids)[:, -seg.n :]
    assert (seen[0][1] - torch.log_softmax(method.block(x0, targets[None], lm.logits(x0))[0][0], -1)).abs().max() > 1e-4


def test_bad_parameters_are_reported_with_their_fix():
    discover()
    for name in ("fwl", "fwl-dynamic-eval"):
        _, errs = method_class(name).make_params({"size": 0, "val_tokens": 10**6, "chunk": 0, "fast_state": "all"})
        text = " | ".join(errs)
        assert "fast_state: expected one of 'document', 'window'" in text
        _, errs = method_class(name).make_params({"size": 0, "val_tokens": 10**6, "chunk": 0})
        text = " | ".join(errs)
        assert "size must be >= 1" in text and "val_tokens" in text and "chunk must be >= 1" in text
    _, errs = method_class("fwl-dynamic-eval").make_params({"dyn_lr": 0, "dyn_params": "some"})
    assert any("dyn_params" in e for e in errs)
    # train_fast_state auto follows the evaluation's fast_state, and is part of the checkpoint key resolved
    from tta_bench_methods.fwl.train import train_fields

    for state in ("document", "window"):
        params, _ = method_class("fwl").make_params({"fast_state": state})
        assert train_fields(params)["train_fast_state"] == state
    params, _ = method_class("fwl").make_params({"fast_state": "document", "train_fast_state": "window"})
    assert train_fields(params)["train_fast_state"] == "window"


def test_untrained_block_barely_changes_the_base(tiny_lm):
    """U starts at u_scale times the head's best rank-m part (or random at that scale)."""
    from tta_bench_methods.fwl.train import init_block

    x = tiny_lm.hidden(torch.tensor([list(b"the block starts small, the base model decides")]))
    base = tiny_lm.logits(x)
    y = torch.tensor([list(b"he block starts small, the base model decides.")])
    for u_init in ("head", "random"):
        block = init_block(tiny_lm, TrainConfig(size=16, u_init=u_init, u_scale=0.01))
        with torch.no_grad():
            logits, _ = block(x, y, base)
        assert (logits - base).abs().max() < 0.05 * base.abs().max()
        assert (logits - base).abs().max() > 0


def test_lanes_interleave_documents_each_in_order():
    """train_lanes: documents open at once, one piece of each in turn: every piece once, each document's
    pieces in order in one lane and fresh only at its first, and consecutive steps from different
    documents while two are open."""
    from types import SimpleNamespace

    import tta_bench_methods.fwl.train as fwl

    sizes = [5, 1, 3, 4, 2]
    pieces = [SimpleNamespace(doc=d, offset=i) for d, n in enumerate(sizes) for i in range(n)]
    order = fwl._in_order(pieces, "document", torch.Generator().manual_seed(3), lanes=3)
    assert sorted(id(p) for p, _, _ in order) == sorted(id(p) for p in pieces)
    for d in range(len(sizes)):
        mine = [(p, fresh, lane) for p, fresh, lane in order if p.doc == d]
        assert [p.offset for p, _, _ in mine] == list(range(sizes[d])) and len({lane for *_, lane in mine}) == 1
        assert [fresh for _, fresh, _ in mine] == [True] + [False] * (sizes[d] - 1)
    switches = sum(a.doc != b.doc for (a, _, _), (b, _, _) in zip(order, order[1:]))
    assert switches >= len(order) - 1 - (max(sizes) - 1)  # only the last open document repeats itself
    assert [lane for *_, lane in fwl._in_order(pieces, "document", None, lanes=1)] == [0] * len(pieces)


@torch.no_grad()
def test_training_reads_documents_in_order_with_the_state_carried(tiny_lm):
    """train_fast_state=document: a document's pieces follow each other (documents shuffled), the state
    carried from piece to piece, so the validation loss equals one pass over each whole document."""
    import tta_bench_methods.fwl.train as fwl

    torch.manual_seed(0)
    tc = TrainConfig(
        size=4,
        train_tokens=200,
        val_tokens=40,
        train_window=16,
        train_seq_len=8,
        u_scale=3.0,
        train_fast_state="document",
    )
    stream = tokenize(
        [Document(f"d{i}", t) for i, t in enumerate(["first document text here", "second one, longer than the first"])],
        tiny_lm.tokenizer,
        "t",
        "train",
    )
    train, val = fwl._pieces(tiny_lm, tc, stream, PrepareData("train", None, tiny_lm))
    order = fwl._in_order(train, "document", torch.Generator().manual_seed(1))
    assert sorted(id(p) for p, _, _ in order) == sorted(id(p) for p in train)
    for (a, _, _), (b, fresh, _) in zip(order, order[1:]):
        assert fresh == (a.doc != b.doc) and (fresh or b.offset == a.offset + len(a.targets))
    assert all(fresh for _, fresh, _ in fwl._in_order(train, "window", torch.Generator().manual_seed(1)))
    block = fwl.init_block(tiny_lm, tc)
    with torch.no_grad():
        for p in block.eta.parameters():
            p.fill_(2.0)  # a strong fast-weight effect, so a lost state would show
    got, _ = fwl._validate(tiny_lm, block, val, tc, chunk=3)
    runs = {}
    for p in val:
        runs.setdefault(p.doc, []).append(p)
    tot, n = 0.0, 0
    for ps in runs.values():
        x = torch.cat([p.hidden for p in ps])[None]
        y = torch.cat([p.targets for p in ps])[None]
        logits, _ = block(x, y, tiny_lm.logits(x))
        tot += F.cross_entropy(logits[0], y[0], reduction="sum").item()
        n += y.numel()
    assert abs(got - tot / n) < 1e-5
    window = TrainConfig(**{**fwl.train_fields(tc), "train_fast_state": "window"})
    assert abs(fwl._validate(tiny_lm, block, val, window, chunk=3)[0] - got) > 1e-4
