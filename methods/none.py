"""The base model with a sliding window: the reference every other method is compared with."""

from __future__ import annotations

import torch

from tta_bench.api.method import Method
from tta_bench.api.registry import register_method


@register_method("none")
class NoAdaptation(Method):
    """No adaptation: the base model scores each segment with up to context_len earlier tokens."""

    @classmethod
    def adapts_at_test_time(cls, params) -> bool:
        return False

    @torch.no_grad()
    def score(self, seg):
        return self.lm.logprobs(seg.ids, seg.n)
