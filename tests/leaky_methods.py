"""Deliberately leaky methods (a plugin file: `plugins: [tests/leaky_methods.py]`). Each breaks one
rule of SPEC 2 the way real implementations have, and tests/test_checks.py shows that the matching
check of tta_bench.checks.validity catches it. Never use them for results."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from tta_bench import register_method
from tta_bench.api.method import Method
from tta_bench_methods.ttt.method import TTTNearest


@register_method("leaky-peek")
class PeekAtTarget(Method):
    """Leaky: mixes a point mass on the next input token, which is the target (non-causal input use)."""

    @dataclass
    class Params:
        weight: float = 0.1

    @classmethod
    def adapts_at_test_time(cls, params) -> bool:
        return False

    @torch.no_grad()
    def score(self, seg):
        lam = self.params.weight
        p = self.lm.logprobs(seg.ids, seg.n).exp()
        # input position L-n+k predicts target k; position L-n+k+1 holds that very target (k < n-1)
        nxt = seg.ids[0, seg.ids.shape[1] - seg.n + 1 :]
        p[: len(nxt)] *= 1 - lam
        p[torch.arange(len(nxt)), nxt] += lam
        return p.log()


class _HeadSGD(Method):
    """Shared by the leaky methods that move the output head: SGD on the head weight, undone at reset."""

    @dataclass
    class Params:
        lr: float = 1.0

    def __init__(self, lm, params, seed=0, protocol=None):
        super().__init__(lm, params, seed, protocol)
        self.w0 = lm.head.weight.detach().clone()

    @classmethod
    def adapts_at_test_time(cls, params) -> bool:
        return True

    def step(self, ids, targets):
        """One SGD step on the head: mean NLL of `targets` given hidden states at `ids`."""
        w = self.lm.head.weight
        h = self.lm.hidden(ids)[0, -len(targets) :].detach()
        with torch.enable_grad():
            w.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(F.linear(h, w).float(), targets), w)
            w.requires_grad_(False)
        with torch.no_grad():
            w -= self.params.lr * g

    def reset(self):
        with torch.no_grad():
            self.lm.head.weight.copy_(self.w0)

    def close(self):
        self.reset()


@register_method("leaky-adapt-first")
class AdaptBeforeScoring(_HeadSGD):
    """Leaky: steps on a segment's own tokens (the inputs, i.e. all targets but the last) before scoring it."""

    @torch.no_grad()
    def score(self, seg):
        ids = seg.ids[0]
        self.step(seg.ids[:, :-1], ids[1:])
        return self.lm.logprobs(seg.ids, seg.n)


@register_method("leaky-keeps-weights")
class KeepsWeights(_HeadSGD):
    """Leaky: proper dynamic evaluation of the head, but close() leaves the shared model adapted."""

    @torch.no_grad()
    def score(self, seg):
        return self.lm.logprobs(seg.ids, seg.n)

    def adapt(self, seg):
        self.step(seg.ids, seg.targets)

    def close(self):
        pass


@register_method("leaky-unnormalised")
class Unnormalised(Method):
    """Leaky: adds `shift` to the log-probabilities of one position (document `doc`, token `token`)."""

    @dataclass
    class Params:
        shift: float = 0.25
        doc: int = 1
        token: int = 5

    @classmethod
    def adapts_at_test_time(cls, params) -> bool:
        return False

    @torch.no_grad()
    def score(self, seg):
        lp = self.lm.logprobs(seg.ids, seg.n)
        k = self.params.token - seg.start
        if seg.doc == self.params.doc and 0 <= k < seg.n:
            lp[k] += self.params.shift
        return lp


@register_method("leaky-split")
class UnigramFromFile(Method):
    """Leaky when `path` names evaluated data: a unigram mixture fitted on the text of `path`, in
    prepare or (`when: score`) at the first segment it scores (else on the prepare split, which is fine)."""

    @dataclass
    class Params:
        path: str = ""
        weight: float = 0.5
        when: Literal["prepare", "score"] = "prepare"

    @classmethod
    def adapts_at_test_time(cls, params) -> bool:
        return False

    def prepare(self, data):
        self.unigram = None
        if not self.params.path:
            self._fit([t for d in data.load().docs for t in d.ids])
        elif self.params.when == "prepare":
            self._read()

    def _read(self):
        with open(self.params.path, encoding="utf-8") as f:
            self._fit(self.lm.tokenizer.encode(f.read())[0])

    def _fit(self, ids):
        counts = torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=self.lm.vocab_size).float() + 1
        self.unigram = (counts / counts.sum()).log().to(self.lm.device)

    @torch.no_grad()
    def score(self, seg):
        if self.unigram is None:
            self._read()
        lam = torch.tensor(self.params.weight)
        lp = self.lm.logprobs(seg.ids, seg.n)
        return torch.logaddexp(lp + torch.log1p(-lam), self.unigram + lam.log())


@register_method("leaky-unseeded")
class Unseeded(Method):
    """Leaky: a per-token bias drawn in prepare from the operating system, not from the cell's seed."""

    @dataclass
    class Params:
        scale: float = 0.1

    @classmethod
    def adapts_at_test_time(cls, params) -> bool:
        return False

    def prepare(self, data):
        g = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        self.bias = (torch.randn(self.lm.vocab_size, generator=g) * self.params.scale).to(self.lm.device)

    @torch.no_grad()
    def score(self, seg):
        h = self.lm.hidden(seg.ids)[0, -seg.n :]
        return F.log_softmax(self.lm.logits(h) + self.bias, dim=-1)


@register_method("leaky-no-reset")
class NoReset(KeepsWeights):
    """Leaky: dynamic evaluation of the head whose reset() keeps the adapted weights (documents are not
    independent under reset=document, and a second pass starts adapted); close() does restore them."""

    def reset(self):
        pass

    def close(self):
        with torch.no_grad():
            self.lm.head.weight.copy_(self.w0)


@register_method("leaky-ttt-query-first")
class TTTQueryFirst(TTTNearest):
    """Leaky: ttt-nn in Hardt & Sun's order: retrieves with the segment about to be scored and steps on
    its nearest chunks before scoring it (the query holds tokens not yet scored)."""

    def score(self, seg):
        self.train_on(self.choose(seg))
        return super().score(seg)

    def adapt(self, seg):
        pass
