"""The retrieval methods: kNN-LM (Khandelwal et al. 2020), the continuous cache (Grave et al. 2017),
and both together (Khandelwal et al. 2020, section 6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from tta_bench.api.method import Method
from tta_bench.api.registry import register_method

from .cache import CachePart, cache_problems
from .knn import KnnPart, knn_problems

KNN_FIELDS = ("k", "lam", "temperature", "key", "index", "nlist", "code_size", "nprobe", "rerank", "datastore_tokens")


def knn_control(p) -> dict:
    """kNN-LM's control (SPEC 3): the same datastore, static (no scored token added)."""
    return {"method": "knn-lm", "params": {**{k: getattr(p, k) for k in KNN_FIELDS}, "online": False}}


@register_method("knn-lm")
class KnnLM(Method):
    """kNN-LM: interpolate with a faiss nearest-neighbour datastore built from the prepare split."""

    claim = "WikiText-103 test perplexity 18.65 -> 16.12 by retrieval alone, no training (Khandelwal et al. 2020)"
    claim_setting = "a 103M-key datastore (all of WikiText-103 train), k 1024, lambda and temperature tuned on valid"

    requires = ("faiss-cpu",)

    @dataclass
    class Params:
        k: int = 1024  # neighbours per position
        lam: float = 0.25  # lambda: weight of p_knn
        temperature: float = 1.0  # p_knn ~ exp(-squared L2 distance / temperature)
        key: Literal["ffn_input", "hidden"] = "ffn_input"  # last block's feed-forward input, or final hidden state
        index: Literal["auto", "exact", "ivfpq"] = "auto"  # auto: exact below 100k keys, else IVF-PQ
        nlist: int = 1024  # IVF cells
        code_size: int = 64  # PQ bytes per key (must divide the key dimension)
        nprobe: int = 32  # IVF cells searched per query
        rerank: int = 1  # IVF-PQ: re-rank rerank*k candidates by exact distance (0: PQ distances)
        online: bool = False  # also add each scored test token to the datastore (reset per the policy)
        datastore_tokens: Optional[int] = None  # cap on prepare-split tokens (None: all)

        def problems(self):
            return knn_problems(self)

    quick_params = {"k": 16, "datastore_tokens": 2000}
    # the validity checks also run these on the tiny model (64-dim keys)
    check_variants = [{"online": True}, {"index": "ivfpq", "nlist": 4, "code_size": 8, "nprobe": 2, "online": True}]

    @classmethod
    def adapts_at_test_time(cls, params) -> bool:
        return params.online  # static: the datastore is domain adaptation, not test-time adaptation

    @classmethod
    def control(cls, params):
        return knn_control(params) if params.online else None

    def prepare(self, data):
        self.knn = KnnPart(self, self.params)
        self.knn.prepare(data)

    def reset(self):
        self.knn.reset()

    @classmethod
    def runs_in_lanes(cls, params) -> bool:
        return True  # the datastore shared by every lane, an online part per lane

    def open_lanes(self, n):
        self.knn.open_lanes(n)

    def reset_lane(self, lane):
        self.knn.reset_lane(lane)

    def score(self, seg):
        return self.score_lanes([seg])[0]

    @torch.no_grad()
    def score_lanes(self, segs):
        hs, keys = zip(*self.knn.reader.lanes([s.ids for s in segs], [s.n for s in segs]))
        lps = F.log_softmax(self.lm.logits_rows(list(hs)), dim=-1).split([s.n for s in segs])
        return self.knn.apply(list(lps), list(keys), [s.lane for s in segs])

    def adapt(self, seg):
        self.adapt_lanes([seg])

    def adapt_lanes(self, segs):
        self.knn.adapt([s.lane for s in segs], [s.targets for s in segs])


@register_method("cache")
class ContinuousCacheLM(Method):
    """Continuous cache: interpolate with p(w) ~ sum exp(theta h_t.h_i) over recent positions followed by w."""

    claim = "WikiText-2 perplexity 99.3 -> 68.9 for an LSTM with a 2000-token cache (Grave et al. 2017)"
    claim_setting = "a continuous stream over the whole test set, window 2000, theta and lambda tuned on valid"

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

    @classmethod
    def adapts_at_test_time(cls, params) -> bool:
        return True  # the cache holds the evaluated stream's own recent positions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.open_lanes(1)

    @classmethod
    def runs_in_lanes(cls, params) -> bool:
        return True  # a cache per lane

    def open_lanes(self, n):
        p = self.params
        self.caches = [CachePart(self, p.window, p.theta, p.lam) for _ in range(n)]

    def reset(self):
        for cache in self.caches:
            cache.reset()

    def reset_lane(self, lane):
        self.caches[lane].reset()

    def score(self, seg):
        return self.score_lanes([seg])[0]

    @torch.no_grad()
    def score_lanes(self, segs):
        hs = [h[-s.n :] for h, s in zip(self.lm.hidden_lanes([s.ids for s in segs]), segs)]
        lps = F.log_softmax(self.lm.logits_rows(hs), dim=-1).split([s.n for s in segs])
        return [self.caches[s.lane].apply(lp, h, s) for s, lp, h in zip(segs, lps, hs)]

    def adapt(self, seg):
        self.adapt_lanes([seg])

    def adapt_lanes(self, segs):
        for s in segs:
            self.caches[s.lane].adapt(s.targets)


@register_method("knn-cache")
class KnnCache(Method):
    """kNN-LM + continuous cache: a faiss datastore from the prepare split and a cache of the stream."""

    requires = ("faiss-cpu",)

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
        theta: float = 0.01  # cache inverse temperature (see ContinuousCacheLM)
        cache_lam: float = 0.1  # weight of p_cache

        def problems(self):
            return knn_problems(self) + cache_problems(self.window, self.theta, self.cache_lam, "cache_lam")

    quick_params = {"k": 16, "datastore_tokens": 2000, "window": 64}
    check_variants = [{"online": True}]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.open_lanes(1)

    @classmethod
    def runs_in_lanes(cls, params) -> bool:
        return True  # a cache and an online part per lane, the datastore shared

    def open_lanes(self, n):
        p = self.params
        self.caches = [CachePart(self, p.window, p.theta, p.cache_lam) for _ in range(n)]
        if getattr(self, "knn", None) is not None:  # the constructor opens one lane before prepare
            self.knn.open_lanes(n)

    def reset_lane(self, lane):
        self.caches[lane].reset()
        self.knn.reset_lane(lane)

    @classmethod
    def adapts_at_test_time(cls, params) -> bool:
        return True  # the cache learns the evaluated stream, whatever the datastore does

    @classmethod
    def control(cls, params):
        return knn_control(params)

    def prepare(self, data):
        self.knn = KnnPart(self, self.params)
        self.knn.prepare(data)

    def reset(self):
        self.knn.reset()
        for cache in self.caches:
            cache.reset()

    def score(self, seg):
        return self.score_lanes([seg])[0]

    @torch.no_grad()
    def score_lanes(self, segs):
        hs, keys = zip(*self.knn.reader.lanes([s.ids for s in segs], [s.n for s in segs]))
        lps = F.log_softmax(self.lm.logits_rows(list(hs)), dim=-1).split([s.n for s in segs])
        mixed = self.knn.apply(list(lps), list(keys), [s.lane for s in segs])
        return [self.caches[s.lane].apply(lp, h, s) for s, lp, h in zip(segs, mixed, hs)]

    def adapt(self, seg):
        self.adapt_lanes([seg])

    def adapt_lanes(self, segs):
        self.knn.adapt([s.lane for s in segs], [s.targets for s in segs])
        for s in segs:
            self.caches[s.lane].adapt(s.targets)
