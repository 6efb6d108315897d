"""Low-rank dynamic evaluation (`dynamic-eval` with `params: lora`): the adapter computes what peft's
LoraLayer computes; each step equals the low-rank update written out by hand from the full weights'
gradient (g_B = s G A^T, g_A = s B^T G, G = dL/dW of the merged weight W + s B A); the rms statistics;
resets drop the update; close gives the shared model back; FLOPs in closed form."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.test_dynamic_eval import C, PREP_TEXT, S, TEXT, in_float64, make, naive_logprobs, run, stream_of, windows
from tta_bench.api.errors import TTABenchError
from tta_bench.api.method import method_class
from tta_bench.api.task import Document
from tta_bench.prepare.prepared import PrepareData
from tta_bench.protocol.evaluate import Protocol, evaluate
from tta_bench.protocol.models import load_model
from tta_bench.protocol.stream import tokenize
from tta_bench_methods._common.lora import LoraAdapter

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = r"(q|v|down)_proj$"
RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK


@pytest.fixture()
def lm():
    return load_model("tiny", device="cpu")  # fresh: the tests write into the model


def targets_of(model) -> dict[str, torch.nn.Linear]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith(("q_proj", "v_proj", "down_proj"))
    }


def test_the_adapter_computes_what_peft_computes_and_removing_it_restores_the_model(lm):
    peft = pytest.importorskip("peft")
    ids = torch.tensor([[256] + list(b"low-rank adapters on a tiny model")])
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits
    adapter = LoraAdapter(lm.model, TARGETS, RANK, ALPHA, seed=3)
    gen = torch.Generator().manual_seed(1)
    for b in adapter.B:  # a non-zero B, so the adapter changes the output
        b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    ours = lm.model(input_ids=ids).logits.detach()

    adapter.remove()
    theirs_model = peft.inject_adapter_in_model(
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0),
        copy.deepcopy(lm.model),
    )
    layers = {n: m for n, m in theirs_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert sorted(layers) == sorted(adapter.names)
    with torch.no_grad():
        for name, a, b in zip(adapter.names, adapter.A, adapter.B):
            layers[name].lora_A["default"].weight.copy_(a)
            layers[name].lora_B["default"].weight.copy_(b)
        theirs = theirs_model(input_ids=ids).logits
        after = lm.model(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-3  # the adapter does something
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    assert torch.equal(after, base)  # removed: the model computes what it did before


def test_a_pattern_matching_no_linear_layer_is_refused_with_the_names(lm):
    with pytest.raises(TTABenchError, match="matches no linear layer.*names look like"):
        LoraAdapter(lm.model, "no_such_layer", RANK, ALPHA)
    for values in ({"params": "lora", "lora_rank": 0}, {"params": "lora", "lora_targets": "("}):
        params, errs = method_class("dynamic-eval").make_params(values)
        assert params is None and errs, values


def explicit_steps(model, adapter_init, protocol_windows, lr, decay, denom=None, rms=None, context_grad=False):
    """The low-rank updates by hand on a plain copy of the model, no adapter code: per segment, merge
    W + s B A into the weights, score, take G = dL/dW of the merged weights (dW of the base frozen), and
    step A and B with g_A = s B^T G, g_B = s G A^T. sgd: X - lr g + decay (X0 - X); rms: X - lr g /
    denom - decay * rms * (X - X0). Returns the log-probabilities per segment and the final (A, B)."""
    named = targets_of(model)
    names = list(named)
    A0 = [a.clone() for a in adapter_init[0]]
    A, B = [a.clone() for a in adapter_init[0]], [b.clone() for b in adapter_init[1]]
    W = {n: named[n].weight.detach().clone() for n in names}
    scores = []
    for ids, targets in protocol_windows:
        with torch.no_grad():
            for i, n in enumerate(names):
                named[n].weight.copy_(W[n] + SCALE * B[i] @ A[i])
        for p in model.parameters():
            p.requires_grad_(False)
        for n in names:
            named[n].weight.requires_grad_(True)
        lp = naive_logprobs(model, ids, len(targets), context_grad)
        scores.append(lp.detach())
        G = torch.autograd.grad(F.nll_loss(lp, targets), [named[n].weight for n in names])
        for i in range(len(names)):
            gA, gB = SCALE * B[i].T @ G[i], SCALE * G[i] @ A[i].T
            X0 = (A0[i], torch.zeros_like(B[i]))
            new = []
            for j, (x, g) in enumerate(((A[i], gA), (B[i], gB))):
                if denom is None:
                    new.append(x - lr * g + decay * (X0[j] - x))
                else:
                    new.append(x - lr * g / denom[2 * i + j] - decay * rms[2 * i + j] * (x - X0[j]))
            A[i], B[i] = new
    return scores, A, B


@pytest.mark.parametrize("decay,context_grad", [(0.0, False), (0.05, False), (0.0, True)])
def test_each_sgd_step_equals_the_explicit_low_rank_update(lm, decay, context_grad):
    in_float64(lm)
    protocol = Protocol(S, C, "document")
    stream = stream_of(lm, [TEXT[: 3 * S]])
    naive = copy.deepcopy(lm.model)
    lr = 0.05
    method = make(
        lm,
        protocol,
        params="lora",
        lora_rank=RANK,
        lora_alpha=ALPHA,
        lora_targets=TARGETS,
        lr=lr,
        decay=decay,
        context_grad=context_grad,
    )
    init = ([a.clone() for a in method.adapter.A], [b.clone() for b in method.adapter.B])
    assert all(b.abs().max() == 0 for b in init[1])  # B starts at 0: the first scoring is the base model's
    got = run(method, stream, protocol)
    W = windows(stream.docs[0].ids, lm.start_id, 3)
    want, A, B = explicit_steps(naive, init, W, lr, decay, context_grad=context_grad)
    for lp, ref in zip(got, want):
        assert (lp - ref).abs().max().item() < 1e-6
    base = load_model("tiny", device="cpu").model.double()
    ids, targets = W[2]
    assert (got[2] - naive_logprobs(base, ids, len(targets), context_grad).detach()).abs().max() > 1e-3  # an effect
    for a, b, a_ref, b_ref in zip(method.adapter.A, method.adapter.B, A, B):
        assert torch.allclose(a, a_ref, atol=1e-9, rtol=0) and torch.allclose(b, b_ref, atol=1e-9, rtol=0)
    # two steps moved A (its first gradient, with B = 0, is exactly 0) and B
    assert all((a - a0).abs().max() > 0 for a, a0 in zip(A, init[0])) and all(b.abs().max() > 0 for b in B)
    method.close()


def test_the_first_step_moves_b_only_by_minus_lr_s_g_a_transposed(lm):
    """The closed form of step one: B = 0, so g_A = 0 and B1 = -lr * s * G A0^T, G the base model's gradient."""
    in_float64(lm)
    protocol = Protocol(S, C, "document")
    stream = stream_of(lm, [TEXT[:S]])  # one segment: one step
    lr = 0.1
    method = make(lm, protocol, params="lora", lora_rank=RANK, lora_alpha=ALPHA, lora_targets=TARGETS, lr=lr)
    A0 = [a.clone() for a in method.adapter.A]
    run(method, stream, protocol)
    base = load_model("tiny", device="cpu").model.double()
    named = targets_of(base)
    ids, targets = windows(stream.docs[0].ids, lm.start_id, 1)[0]
    for p in base.parameters():
        p.requires_grad_(False)
    weights = [m.weight.requires_grad_(True) for m in named.values()]
    G = torch.autograd.grad(F.nll_loss(naive_logprobs(base, ids, len(targets)), targets), weights)
    for a, a0, b, g in zip(method.adapter.A, A0, method.adapter.B, G):
        assert torch.equal(a, a0)
        assert torch.allclose(b, -lr * SCALE * g @ a0.T, atol=1e-12, rtol=1e-9)
    method.close()


@pytest.mark.parametrize("decay", [0.0, 0.02])
def test_rms_statistics_and_steps_equal_the_hand_written_ones(lm, decay):
    """The statistics are gathered with the adapter at its start: B's ms is a real mean of g_B^2, A's is
    exactly 0 (g_A = s B^T G with B = 0), so A's denominator is eps."""
    in_float64(lm)
    protocol = Protocol(S, C, "document")
    stream = stream_of(lm, [TEXT[: 3 * S]])
    prep = stream_of(lm, [PREP_TEXT], split="train")
    naive = copy.deepcopy(lm.model)
    lr, eps, n_stat = 1e-3, 1e-4, 3
    method = make(
        lm,
        protocol,
        params="lora",
        lora_rank=RANK,
        lora_alpha=ALPHA,
        lora_targets=TARGETS,
        variant="rms",
        lr=lr,
        eps=eps,
        decay=decay,
        n_stat_segments=n_stat,
    )
    init = ([a.clone() for a in method.adapter.A], [b.clone() for b in method.adapter.B])
    load = lambda limit_tokens=None, limit_docs=None: tokenize(  # noqa: E731
        [Document("p", PREP_TEXT)], lm.tokenizer, "t", "train", limit_docs, limit_tokens
    )
    method.prepare(PrepareData("train", load, lm))
    got = run(method, stream, protocol)

    named = targets_of(naive)
    for p in naive.parameters():
        p.requires_grad_(False)
    weights = [named[n].weight.requires_grad_(True) for n in named]
    ms = [torch.zeros_like(t) for pair in zip(*init) for t in pair]
    for ids, targets in windows(prep.docs[0].ids, lm.start_id, n_stat):
        G = torch.autograd.grad(F.nll_loss(naive_logprobs(naive, ids, len(targets)), targets), weights)
        for i, (g, a) in enumerate(zip(G, init[0])):
            ms[2 * i + 1] += (SCALE * g @ a.T) ** 2  # g_B; g_A is 0, its ms stays 0
    rms = [(m / n_stat).sqrt() for m in ms]
    assert all(r.abs().max() == 0 for r in rms[0::2]) and all(r.abs().max() > 0 for r in rms[1::2])
    want, A, B = explicit_steps(
        naive, init, windows(stream.docs[0].ids, lm.start_id, 3), lr, decay, [r + eps for r in rms], rms
    )
    for lp, ref in zip(got, want):
        assert (lp - ref).abs().max().item() < 1e-6
    for a, b, a_ref, b_ref in zip(method.adapter.A, method.adapter.B, A, B):
        assert torch.allclose(a, a_ref, atol=1e-9, rtol=0) and torch.allclose(b, b_ref, atol=1e-9, rtol=0)
    method.close()


def test_a_reset_drops_the_update_and_close_gives_the_model_back(lm):
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    docs = [TEXT * 2, TEXT[::-1]]
    protocol = Protocol(S, C, "document")
    base = make(lm, protocol, lr=1e-12)  # full dynamic evaluation that practically does not move: the base model
    first = run(base, stream_of(lm, docs), protocol)
    base.close()
    method = make(lm, protocol, params="lora", lr=0.1)
    got = run(method, stream_of(lm, docs), protocol)
    n0 = -(-len(docs[0]) // S)
    assert torch.allclose(got[0], first[0], atol=1e-6) and torch.allclose(got[n0], first[n0], atol=1e-6)
    assert (got[1] - first[1]).abs().max() > 1e-3  # adapted within the document
    method.close()
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert not any(m._forward_hooks for m in lm.model.modules())


def test_flops_count_the_adapters_forward_backward_and_update(lm):
    protocol = Protocol(S, C, "document")
    stream = stream_of(lm, [TEXT * 2])
    found = {}
    for params in ("all", "lora"):
        method = make(lm, protocol, params=params, lora_rank=RANK, lora_alpha=ALPHA, lora_targets=TARGETS, lr=1e-3)
        shapes = []
        evaluate(method, stream, protocol, progress=False, observer=lambda seg, lp, t: shapes.append(seg.ids.shape[1]))
        method.close()
        found[params] = lm.ledger.resolve()["flops"]
    full, lora = found["all"], found["lora"]
    widths = sum(m.in_features + m.out_features for m in targets_of(lm.model).values())
    # every input position of every segment goes through A then B of every target: rank * (in + out) each
    assert lora["forward.lora"] == sum(shapes) * RANK * widths
    assert lora["forward.body"] == full["forward.body"] and lora["forward.head"] == full["forward.head"]
    numel = sum(RANK * (m.in_features + m.out_features) for m in targets_of(lm.model).values())
    assert lora["adapt.update"] == len(shapes) * numel  # one multiply-add per adapter element
    # the backward reaches the first block's adapters (input gradients throughout) but no base weight's gradient
    assert 0 < lora["adapt.backward"] < full["adapt.backward"]


def test_a_shared_pass_of_the_base_model_never_stands_in_for_the_adapted_one(lm):
    """The adapter's hooks are not among the model's parameters whose versions key a shared pass of the
    base model (tta_bench.protocol.shared_pass): with `none`'s passes at hand, LoRA dynamic evaluation
    scores as without them."""
    shared_pass = pytest.importorskip("tta_bench.protocol.shared_pass")
    protocol = Protocol(S, C, "document")
    stream = stream_of(lm, [TEXT * 2])
    alone = make(lm, protocol, params="lora", lr=0.1, context_grad=True)  # every window through lm.forward
    want = run(alone, stream, protocol)
    alone.close()
    lm.passes = shared_pass.SharedPasses()
    none = method_class("none")(lm, method_class("none").make_params({})[0], protocol=protocol)
    run(none, stream, protocol)  # every window's base pass is now shared
    method = make(lm, protocol, params="lora", lr=0.1, context_grad=True)
    got = run(method, stream, protocol)
    method.close()
    assert lm.passes.hits > 0 or lm.passes.misses > 0  # the LM consulted the shared passes
    assert all(torch.equal(a, b) for a, b in zip(got, want))
