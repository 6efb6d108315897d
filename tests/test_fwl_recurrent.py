"""Chunk-recurrent fast weights (block.py, `recurrent`) against their explicit definition: chunk by chunk,
every gradient of chunk k taken at the fast weights theta_k the earlier chunks left, and inside a chunk
one SGD step on the chunk's earlier positions; decayed timescales (decayed.py) combined with it."""

import pytest
import torch
import torch.nn.functional as F

from tests.test_fwl import D, M, T, V, data, random_block, rel_err
from tests.test_fwl_decayed import explicit_logits
from tta_bench_methods.fwl.block import FWBlock, FWLConfig, FWStream

pytestmark = pytest.mark.usefixtures("one_thread")


def recurrent_block(seed=0, timescales=()):
    return random_block(seed, timescales=timescales, recurrent=True)


def chunks(lengths, chunk):
    """[a, b) of each chunk when segments of `lengths` are each cut into chunks of `chunk`."""
    out, a = [], 0
    for n in lengths:
        out += [(s, min(s + chunk, a + n)) for s in range(a, a + n, chunk)]
        a += n
    return out


@pytest.mark.parametrize("timescales", [(), (3.0, 40.0)])
@pytest.mark.parametrize("chunk", [T, 4, 1])
def test_recurrent_logits_equal_explicit_chunk_by_chunk_sgd(chunk, timescales):
    block = recurrent_block(timescales=timescales)
    x, y, base = data()
    want = explicit_logits(block, x, y, base, chunks([T], chunk))
    got, _ = block(x[None], y[None], base[None], None, chunk)
    assert rel_err(got[0], want) < 1e-5
    if chunk < T:  # gradients at the moving weights: far from the paper's gradients at the slow weights
        parallel = FWBlock(FWLConfig(D, M, V, 1 / 8, timescales=timescales)).to(torch.float64)
        parallel.load_state_dict(block.state_dict())
        assert rel_err(parallel(x[None], y[None], base[None], None, chunk)[0][0], want) > 1e-2
    else:  # one chunk: every gradient at the slow weights, which is the paper's step, far from chunks of 1
        parallel = FWBlock(FWLConfig(D, M, V, 1 / 8, timescales=timescales)).to(torch.float64)
        parallel.load_state_dict(block.state_dict())
        assert rel_err(parallel(x[None], y[None], base[None], None, chunk)[0][0], want) < 1e-10
        assert rel_err(explicit_logits(block, x, y, base, chunks([T], 1)), want) > 1e-2


@pytest.mark.parametrize("timescales", [(), (3.0, 40.0)])
def test_recurrent_state_streamed_across_segments_equals_explicit(timescales):
    """Segments of 5, 1 and 7 through FWStream, chunk 3: the segments' chunks, the state carried, each
    segment's last gradient committed once its target is known, equal the explicit chunk-by-chunk SGD."""
    block = recurrent_block(4, timescales)
    x, y, base = data(4)
    want = explicit_logits(block, x, y, base, chunks([5, 1, 7], 3))
    stream, parts = FWStream(block, chunk=3), []
    for a, b in [(0, 5), (5, 6), (6, T)]:
        with torch.no_grad():
            parts.append(stream.segment_logits(x[None, a:b], base[None, a:b], y[None, a : b - 1]))
            stream.commit(y[None, b - 1 : b])
    assert rel_err(torch.cat(parts, 1)[0], want.detach()) < 1e-5


def test_meta_gradient_flows_through_earlier_chunks():
    """Training back-propagates through the carried state: the loss of the last chunk depends on the
    first chunk's targets only through the fast weights the first chunk left (its own logits never see them)."""
    block = recurrent_block(7)
    x, y, base = data(7)
    base = base.clone().requires_grad_(True)
    logits, _ = block(x[None], y[None], base[None], None, 4)
    F.cross_entropy(logits[0, 8:], y[8:]).backward()
    assert base.grad[:4].abs().max() > 1e-6  # chunk 0's slow logits -> its gradients -> theta_1, theta_2 -> chunk 2
    assert block.eta["w1"].grad.abs() > 0


def test_the_recurrent_method_sees_its_fast_path(tiny_lm):
    """On the tiny model, carried through documents: the recurrent block's scores differ from its
    step-size-0 control's far beyond the tests' tolerance."""
    from tests.test_fwl import TEXT, make, run, stream_of
    from tta_bench.protocol.evaluate import Protocol

    protocol = Protocol(16, 1, "document")
    fast = make(tiny_lm, protocol=protocol, fast_state="document", recurrent=True, chunk=8, train_steps=6)
    static = make(tiny_lm, name="fwl-static", protocol=protocol, train_steps=6)
    assert fast.block.cfg.recurrent and fast.block.cfg.fast
    stream = stream_of(tiny_lm, TEXT)
    a, b = run(fast, stream, protocol), run(static, stream, protocol)
    assert max((p - q).abs().max().item() for (_, p), (_, q) in zip(a, b)) > 100 * 1e-5
