"""kNN-LM and the continuous cache together (Khandelwal et al. 2020, section 6): the kNN-LM
distribution, then the cache mixed into it: p = (1 - lam_c) [(1 - lam) p_lm + lam p_knn] + lam_c p_cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from tta_bench.memory import CachePart, KnnPart, cache_problems, knn_problems
from tta_bench.method import Method
from tta_bench.registry import register_method


@register_method("knn-cache")
class KnnCache(Method):
    """kNN-LM + continuous cache: a faiss datastore from the prepare split and a cache of the stream."""

    @dataclass
    class Params:
        k: int = 1024
        lam: float = 0.25  # weight of p_knn
        temperature: float = 1.0
        key: Literal["ffn_input", "hidden"] = "ffn_input"
        index: Literal["auto", "exact", "ivfpq"] = "auto"
        nlist: int = 1024
        code_size: int = 64
        nprobe: int = 32
        rerank: int = 1
        online: bool = False
        datastore_tokens: Optional[int] = None
        window: int = 2000  # cache positions
        theta: float = 0.01  # cache inverse temperature (see methods/cache.py)
        cache_lam: float = 0.1  # weight of p_cache

        def problems(self):
            return knn_problems(self) + cache_problems(self.window, self.theta, self.cache_lam, "cache_lam")

    quick_params = {"k": 16, "datastore_tokens": 2000, "window": 64}
    check_variants = [{"online": True}]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        p = self.params
        self.cache = CachePart(self, p.window, p.theta, p.cache_lam)

    def prepare(self, data):
        self.knn = KnnPart(self, self.params)
        self.knn.prepare(data)

    def reset(self):
        self.knn.reset()
        self.cache.reset()

    @torch.no_grad()
    def score(self, seg):
        h, key = self.knn.reader(seg.ids, seg.n)
        lp = F.log_softmax(self.lm.logits(h), dim=-1)
        return self.cache.apply(self.knn.apply(lp, key), h, seg)

    def adapt(self, seg):
        self.knn.adapt(seg.targets)
        self.cache.adapt(seg.targets)
