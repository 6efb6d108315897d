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

    @classmethod
    def runs_in_lanes(cls, params) -> bool:
        return True  # no state: lanes only batch the forward

    def open_lanes(self, n):
        pass

    def reset_lane(self, lane):
        pass

    def score(self, seg):
        return self.score_lanes([seg])[0]

    @torch.no_grad()
    def score_lanes(self, segs):
        return self.lm.logprobs_lanes([s.ids for s in segs], [s.n for s in segs])
