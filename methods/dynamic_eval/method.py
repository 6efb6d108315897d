"""The `dynamic-eval` method (Krause et al. 2018, 2019; SPEC section 3): after scoring a segment, one
gradient step on its mean NLL, keeping the new weights. Its body (the scoring with a fixed KV cache, the
update on adapt, the rms statistics) is tta_bench_methods._common.dyneval, which finetune-dynamic-eval
shares; the update rule is tta_bench_methods._common.update. `params: lora` adapts low-rank adapters
instead of the weights (tta_bench_methods._common.lora; see _common.dyneval on their rms statistics)."""

from __future__ import annotations

from tta_bench.api.registry import register_method
from tta_bench_methods._common.dyneval import DynamicEvalBase


@register_method("dynamic-eval")
class DynamicEval(DynamicEvalBase):
    """Dynamic evaluation (Krause et al.): an SGD or RMS step on each segment after scoring it."""

    claim = "large gains (Krause et al.), for over 3x the compute of standard inference (FWL paper)"
    claim_cost = ("over 3x the FLOPs of standard inference (FWL paper)", ">=", 3.0)  # FLOPs x none
    claim_setting = "WikiText-103 test read as one stream in segments of 128 (thousands of steps), step size and decay tuned (Krause et al. 2019: 18.3 -> 16.4)"
    # low-rank dynamic evaluation (SPEC 3), both update rules
    check_variants = [{"params": "lora"}, {"params": "lora", "variant": "rms", "decay": 0.01}]
