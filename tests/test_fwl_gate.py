"""FWL's Bayesian gate (method.py, `gate: bayes`): the block mixed with the base model by posterior weights
over each document. Checked against the closed form of a two-model Bayesian mixture: a document's total
NLL is -log(1/2 exp(-A) + 1/2 exp(-B)), A and B the ungated block's and the base model's totals."""
import math

import pytest
import torch

from tests.test_fwl import TEXT, make, stream_of
from tta_bench.evaluate import Protocol, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def doc_nll(method, stream, protocol) -> dict[int, float]:
    out: dict[int, float] = {}

    def observe(seg, lp, targets):
        out[seg.doc] = out.get(seg.doc, 0.0) - lp.gather(1, targets[:, None]).sum().item()

    evaluate(method, stream, protocol, progress=False, observer=observe)
    return out


@pytest.mark.parametrize("fast_state", ["document", "window"])
def test_gated_document_nll_is_the_bayesian_mixture_of_block_and_base(tiny_lm, fast_state):
    protocol = Protocol(16, 1, "document")
    stream = stream_of(tiny_lm, TEXT)
    block = doc_nll(make(tiny_lm, protocol=protocol, fast_state=fast_state), stream, protocol)
    gated = doc_nll(make(tiny_lm, protocol=protocol, fast_state=fast_state, gate="bayes"), stream, protocol)
    base = doc_nll(make(tiny_lm, name="none", protocol=protocol), stream, protocol)
    for d in block:
        a, b = block[d], base[d]
        want = -(math.log(0.5) + max(-a, -b) + math.log1p(math.exp(-abs(a - b))))
        assert abs(gated[d] - want) < 1e-4 * want
        assert gated[d] <= min(a, b) + math.log(2) + 1e-6
    # the two experts differ by far more than the tolerance, so the mixture is not trivially either one
    assert max(abs(block[d] - base[d]) for d in block) > 1.0


def test_gate_is_shared_with_the_control_and_makes_the_control_adaptive():
    from tta_bench.method import method_class
    from tta_bench.registry import discover

    discover()
    fwl, static = method_class("fwl"), method_class("fwl-static")
    params, _ = fwl.make_params({"gate": "bayes"})
    control = fwl.control(params)
    assert control["method"] == "fwl-static" and control["params"]["gate"] == "bayes"
    gated_static, _ = static.make_params(control["params"])
    assert static.adapts_at_test_time(gated_static) and static.control(gated_static) is None
    plain, _ = static.make_params({})
    assert not static.adapts_at_test_time(plain) and "gate" not in fwl.control(fwl.make_params({})[0])["params"]
