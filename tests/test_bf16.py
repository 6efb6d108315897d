"""bfloat16 (SPEC 6, `dtype: bfloat16`): every built-in method's nll_sum within 0.5% of float32's, on
the tiny model over documents of different lengths (in lanes too where a lane keeps its own weights). Dynamic evaluation keeps
float32 copies of the weights it adapts (update.DynamicEvaluation), so a step below a bfloat16 weight's
rounding step is not lost."""

from __future__ import annotations

import pytest
import torch

from tests import test_lanes
from tests.test_lanes import OWN_WEIGHTS, _builtin_settings, _record
from tta_bench.protocol.models import load_model

lane_corpus = test_lanes.lane_corpus  # the lanes test's documents (a module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lms():
    return {dtype: load_model("tiny", device="cpu", dtype=dtype) for dtype in ("float32", "bfloat16")}


@pytest.mark.parametrize("name,params", _builtin_settings())
def test_bfloat16_keeps_every_methods_nll_within_half_a_percent(lms, lane_corpus, tmp_path, name, params):
    assert next(lms["bfloat16"].model.parameters()).dtype == torch.bfloat16
    full = _record(lms["float32"], lane_corpus, tmp_path, name, 1, params)
    for lanes in (1, 3) if name in OWN_WEIGHTS or name == "fwl-dynamic-eval" else (1,):  # lanes cast their copies
        half = _record(lms["bfloat16"], lane_corpus, tmp_path, name, lanes, params)
        assert half.ok, half.reason
        nll = sum(d["nll"] for d in full.per_doc)
        assert sum(d["nll"] for d in half.per_doc) == pytest.approx(nll, rel=5e-3), (name, lanes)


def test_bfloat16_dynamic_evaluation_keeps_its_gain_through_float32_copies(lms, lane_corpus, tmp_path, monkeypatch):
    """bfloat16 weights updated in place lose the steps below their rounding step: the float32 copies
    keep dynamic evaluation's gain over `none` within 10% of float32's, and closer to it than without."""
    from tta_bench_methods._common.update import DynamicEvaluation

    def gain(dtype, lanes=1):
        lm = lms[dtype]
        base = sum(d["nll"] for d in _record(lm, lane_corpus, tmp_path, "none", 1).per_doc)
        return base - sum(d["nll"] for d in _record(lm, lane_corpus, tmp_path, "dynamic-eval", lanes).per_doc)

    full = gain("float32")
    kept = [gain("bfloat16", lanes) for lanes in (1, 3)]
    assert all(abs(g - full) < 0.1 * full for g in kept), (full, kept)
    made = DynamicEvaluation.__init__

    def without_copies(self, *args, **kwargs):
        made(self, *args, **kwargs)
        self.master = None  # the rule then runs on the bfloat16 weights themselves
        self.set_originals(self.params)

    monkeypatch.setattr(DynamicEvaluation, "__init__", without_copies)
    lost = gain("bfloat16")
    print(f"dynamic-eval gain over none: float32 {full:.3f}, bfloat16 with float32 copies {kept}, without {lost:.3f}")
    assert abs(lost - full) > 2 * abs(kept[0] - full), (full, kept, lost)
