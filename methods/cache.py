"""Continuous cache (Grave et al. 2017): mix the model with a distribution over the tokens that
followed the most similar recent final hidden states of the stream."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tta_bench.memory import CachePart, cache_problems
from tta_bench.method import Method
from tta_bench.registry import register_method


@register_method("cache")
class ContinuousCacheLM(Method):
    """Continuous cache: interpolate with p(w) ~ sum exp(theta h_t.h_i) over recent positions followed by w."""

    @dataclass
    class Params:
        window: int = 2000  # positions kept (per document under reset=document)
        # inverse temperature on h_t . h_i; scale it to the model's hidden-state norm: 0.01 was best for
        # smollm2-135m (|h| ~ 45) on held-out WikiText-2 valid, Grave et al.'s LSTM used 0.3
        theta: float = 0.01
        lam: float = 0.1  # lambda: weight of p_cache

        def problems(self):
            return cache_problems(self.window, self.theta, self.lam)

    quick_params = {"window": 64}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        p = self.params
        self.cache = CachePart(self, p.window, p.theta, p.lam)

    def reset(self):
        self.cache.reset()

    @torch.no_grad()
    def score(self, seg):
        h = self.lm.hidden(seg.ids)[0, -seg.n:]
        lp = F.log_softmax(self.lm.logits(h), dim=-1)
        return self.cache.apply(lp, h, seg)

    def adapt(self, seg):
        self.cache.adapt(seg.targets)
