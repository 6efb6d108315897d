"""Decayed, multi-timescale fast weights (methods/fwl/decayed.py) against their explicit definition:
theta_i = theta - sum_s eta_{theta,s} sum_{j<i} gamma_s^(i-1-j) dL_j/dtheta, every gradient at the slow weights.
`explicit_logits` also serves the chunk-recurrent tests (gradients at the weights each chunk starts with)."""

import pytest
import torch
import torch.nn.functional as F

from tests.test_fwl import FAST, T, block_params, data, random_block, rel_err, slow_forward
from tta_bench_methods.fwl.block import FWStream

pytestmark = pytest.mark.usefixtures("one_thread")
TIMESCALES = (3.0, 40.0)


def decayed_block(seed=0):
    return random_block(seed, timescales=TIMESCALES)


def explicit_logits(block, x, y, base, bounds=None):
    """Logits by autograd, one position at a time. Position i's weights are
    theta - sum_s eta_s sum_{j<i} gamma_s^(i-1-j) g_j (without timescales: one, gamma 1), g_j the gradient of
    c * CE_j at the weights its chunk [a, b) of `bounds` starts with (None: one chunk, the slow weights)."""
    params = block_params(block)
    gammas = block.gammas() if block.cfg.timescales else torch.ones(1, dtype=x.dtype)
    etas = {k: block.eta[k].reshape(-1) for k in FAST}
    grads, out = [], []

    def weights_at(i):
        w = dict(params)
        for n, k in enumerate(FAST):
            for s in range(len(gammas)):
                for j in range(i):
                    w[k] = w[k] - etas[k][s] * gammas[s] ** (i - 1 - j) * grads[j][n]
        return w

    for a, b in bounds or [(0, len(x))]:
        theta_k = weights_at(a)
        for j in range(a, b):
            loss = block.cfg.norm * F.cross_entropy(
                slow_forward(theta_k, x[j : j + 1], base[j : j + 1], block.cfg.eps), y[j : j + 1], reduction="sum"
            )
            grads.append(torch.autograd.grad(loss, [theta_k[k] for k in FAST], retain_graph=True))
        out += [slow_forward(weights_at(i), x[i : i + 1], base[i : i + 1], block.cfg.eps)[0] for i in range(a, b)]
    return torch.stack(out)


@pytest.mark.parametrize("chunk", [T, 4, 1])
def test_decayed_fast_logits_equal_the_explicit_discounted_step(chunk):
    block = decayed_block()
    x, y, base = data()
    want = explicit_logits(block, x, y, base)
    got, _ = block(x[None], y[None], base[None], None, chunk)
    assert rel_err(got[0], want) < 1e-10
    slow = block.logits(block.slow(x[None]).z, base[None])[0]  # the step is far above the tolerance
    assert rel_err(slow, want) > 1e-2


def test_decayed_state_streamed_across_segments_equals_one_pass():
    block = decayed_block(3)
    x, y, base = data(4)
    whole, _ = block(x[None], y[None], base[None], None, 4)
    stream, parts = FWStream(block, chunk=3), []
    for a, b in [(0, 5), (5, 6), (6, T)]:  # segments of 5, 1 and the rest: the state and its decay carried
        with torch.no_grad():
            parts.append(stream.segment_logits(x[None, a:b], base[None, a:b], y[None, a : b - 1]))
            stream.commit(y[None, b - 1 : b])
    assert rel_err(torch.cat(parts, 1)[0], whole[0].detach()) < 1e-10


def test_decays_and_step_sizes_are_learned_and_gradients_reach_them():
    block = decayed_block(5)
    x, y, base = data(6)
    logits, _ = block(x[None], y[None], base[None], None, 4)
    F.cross_entropy(logits[0], y).backward()
    assert block.decay_logit.grad is not None and block.decay_logit.grad.abs().min() > 0
    assert all(block.eta[k].grad.abs().min() > 0 for k in FAST)
    assert {id(p) for p in block.step_parameters()} == {id(p) for p in block.eta.parameters()} | {id(block.decay_logit)}
    assert all(not n.startswith(("eta.", "decay_logit")) for n, _ in block.slow_parameters())


def test_the_decayed_method_sees_its_fast_path(tiny_lm):
    """On the tiny model, carried through documents: the decayed block's scores differ from its
    step-size-0 control's far beyond the tests' tolerance, and the control stays its slow pass."""
    from tests.test_fwl import TEXT, make, run, stream_of
    from tta_bench.protocol.evaluate import Protocol

    protocol = Protocol(16, 1, "document")
    decayed = make(tiny_lm, protocol=protocol, fast_state="document", timescales=[8.0, 64.0], train_steps=6)
    static = make(tiny_lm, name="fwl-static", protocol=protocol, timescales=[8.0, 64.0], train_steps=6)
    assert decayed.block.cfg.timescales == (8.0, 64.0) and decayed.block.eta["w1"].shape == (2,)
    stream = stream_of(tiny_lm, TEXT)
    fast, slow = run(decayed, stream, protocol), run(static, stream, protocol)
    assert max((a - b).abs().max().item() for (_, a), (_, b) in zip(fast, slow)) > 100 * 1e-5
