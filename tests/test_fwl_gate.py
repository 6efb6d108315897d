"""FWL's gate (method.py, `gate: bayes`): the block mixed with the base model by weights from each
document's earlier tokens. Checked against independent computations from the two ungated models' scores:
with gate_share 0 the closed form of a two-model Bayesian mixture (a document's total NLL is
-log(1/2 exp(-A) + 1/2 exp(-B)), A and B the block's and the base model's totals); with a share, a plain
token-by-token loop over probabilities."""

import math

import pytest

from tests.test_fwl import TEXT, make, stream_of
from tta_bench.protocol.evaluate import Protocol, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def token_logprobs(method, stream, protocol) -> dict[int, list[float]]:
    """Each document's target log-probabilities, in order."""
    out: dict[int, list[float]] = {}

    def observe(seg, lp, targets):
        out.setdefault(seg.doc, []).extend(lp.gather(1, targets[:, None])[:, 0].tolist())

    evaluate(method, stream, protocol, progress=False, observer=observe)
    return out


def loop_mixture(block: list[float], base: list[float], share: float) -> float:
    """-sum log p_mix, w the block's weight: 1/2, then its posterior after each token, shared."""
    w, nll = 0.5, 0.0
    for lb, la in zip(block, base):
        p = w * math.exp(lb) + (1 - w) * math.exp(la)
        nll -= math.log(p)
        w = (1 - share) * (w * math.exp(lb) / p) + share / 2
    return nll


@pytest.fixture(scope="module")
def scored(tiny_lm):
    protocol = Protocol(16, 1, "document")
    stream = stream_of(tiny_lm, TEXT)
    run = lambda name="fwl", **v: token_logprobs(make(tiny_lm, name=name, protocol=protocol, **v), stream, protocol)  # noqa: E731
    return run, run(name="none")


@pytest.mark.parametrize("fast_state", ["document", "window"])
def test_unshared_gate_is_the_bayesian_mixture_of_block_and_base(scored, fast_state):
    run, base = scored
    block, gated = run(fast_state=fast_state), run(fast_state=fast_state, gate="bayes", gate_share=0.0)
    for d in block:
        a, b = -sum(block[d]), -sum(base[d])
        want = -(math.log(0.5) + max(-a, -b) + math.log1p(math.exp(-abs(a - b))))
        assert abs(-sum(gated[d]) - want) < 1e-4 * want
        assert -sum(gated[d]) <= min(a, b) + math.log(2) + 1e-6
    # the two models differ by far more than the tolerance, so the mixture is not trivially either one
    assert max(abs(sum(block[d]) - sum(base[d])) for d in block) > 1.0


def test_shared_gate_equals_a_token_by_token_mixture(scored):
    run, base = scored
    block = run(fast_state="document")
    gated = run(fast_state="document", gate="bayes", gate_share=0.05)
    unshared = run(fast_state="document", gate="bayes", gate_share=0.0)
    for d in block:
        want = loop_mixture(block[d], base[d], 0.05)
        assert abs(-sum(gated[d]) - want) < 1e-4 * want
    # the share changes the result well beyond the tolerance
    assert max(abs(sum(gated[d]) - sum(unshared[d])) for d in block) > 1e-2


def test_gate_is_shared_with_the_control_and_makes_the_control_adaptive():
    from tta_bench.api.method import method_class
    from tta_bench.api.registry import discover

    discover()
    fwl, static = method_class("fwl"), method_class("fwl-static")
    params, _ = fwl.make_params({"gate": "bayes", "gate_share": 0.01})
    control = fwl.control(params)
    assert (
        control["method"] == "fwl-static"
        and control["params"]["gate"] == "bayes"
        and control["params"]["gate_share"] == 0.01
    )
    gated_static, _ = static.make_params(control["params"])
    assert static.adapts_at_test_time(gated_static) and static.control(gated_static) is None
    plain, _ = static.make_params({})
    assert not static.adapts_at_test_time(plain) and "gate" not in fwl.control(fwl.make_params({})[0])["params"]
    assert fwl.make_params({"gate_share": 1.0})[1]  # refused: a share of 1 forgets every token
