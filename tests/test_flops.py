"""FLOP counting (SPEC 5) against closed forms."""

import pytest
import torch

from tta_bench.protocol.flops import Ledger, dispatch_flops, fvcore_count
from tta_bench.protocol.models import TINY_CONFIG


def tiny_closed_form(L: int, vocab: int) -> int:
    """Multiply-adds of every matrix product in the tiny Llama for one sequence of L tokens."""
    d, ff, layers = TINY_CONFIG["hidden_size"], TINY_CONFIG["intermediate_size"], TINY_CONFIG["num_hidden_layers"]
    heads, kv = TINY_CONFIG["num_attention_heads"], TINY_CONFIG["num_key_value_heads"]
    hd = d // heads
    proj = L * d * (heads * hd) * 2 + L * d * (kv * hd) * 2  # q, o; k, v
    mlp = 3 * L * d * ff  # gate, up, down
    attn = heads * L * L * hd * 2  # Q K^T and weights @ V over full matrices
    return layers * (proj + mlp + attn) + L * d * vocab


@pytest.mark.parametrize("L", [1, 37, 100])
def test_fvcore_flops_of_tiny_model_match_closed_form(tiny_lm, L):
    tiny_lm.ledger = Ledger(tiny_lm.fingerprint)
    with torch.no_grad():
        tiny_lm.logprobs(torch.zeros(1, L, dtype=torch.long), L)
    costs = tiny_lm.ledger.resolve()
    total = sum(costs["flops"].values())
    assert total == pytest.approx(tiny_closed_form(L, tiny_lm.vocab_size), rel=0.01)
    assert "aten::scaled_dot_product_attention" not in costs["unsupported_ops"]


def test_ledger_counts_calls_per_shape_and_keeps_method_keys_apart():
    lin = torch.nn.Linear(8, 4, bias=False)
    ledger = Ledger("x")
    for n in (3, 3, 5):
        ledger.record_forward("lin", (n, 8), lambda n=n: fvcore_count(lin, (torch.zeros(n, 8),)))
    ledger.add("adapt.backward", 10)
    ledger.add("adapt.backward", 5)
    ledger.add("search.knn", 7)
    out = ledger.resolve()["flops"]
    assert out == {"forward.lin": (3 + 3 + 5) * 8 * 4, "adapt.backward": 15, "search.knn": 7}


def test_dispatch_flops_uses_fvcore_convention_including_backward():
    a = torch.randn(6, 5, requires_grad=True)
    b = torch.randn(5, 7)

    def step():
        (a @ b).sum().backward()

    # forward 6*5*7 multiply-adds; backward computes grad of a: 6*7*5
    assert dispatch_flops(step) == 2 * 6 * 5 * 7
