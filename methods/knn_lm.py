"""kNN-LM (Khandelwal et al. 2020): mix the model with a nearest-neighbour distribution over a
datastore of (key at position t, token t+1) built from the prepare split with the base model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from tta_bench.memory import KnnPart, knn_problems
from tta_bench.method import Method
from tta_bench.registry import register_method


@register_method("knn-lm")
class KnnLM(Method):
    """kNN-LM: interpolate with a faiss nearest-neighbour datastore built from the prepare split."""

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

    def prepare(self, data):
        self.knn = KnnPart(self, self.params)
        self.knn.prepare(data)

    def reset(self):
        self.knn.reset()

    @torch.no_grad()
    def score(self, seg):
        h, key = self.knn.reader(seg.ids, seg.n)
        lp = F.log_softmax(self.lm.logits(h), dim=-1)
        return self.knn.apply(lp, key)

    def adapt(self, seg):
        self.knn.adapt(seg.targets)
