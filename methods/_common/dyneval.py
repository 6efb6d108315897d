"""The body of the dynamic-eval method (Krause et al. 2018, 2019; SPEC section 3), registered by
`dynamic-eval` and, starting from fine-tuned weights, by `finetune-dynamic-eval`: after scoring a
segment, one gradient step on its mean NLL, keeping the new weights. The update rule is `update.py`.

Cost: the scoring forward runs with autograd on and its graph is kept until `adapt`, where the loss is
the segment's mean NLL from those very log-probabilities (the same context the scoring used), so each
segment costs one forward, one backward and one update.

Context: by default the context is a fixed KV cache, as in Transformer-XL (which Krause et al. 2019
adapted): its keys and values come from a no-grad forward, the segment attends to them, and the
gradient stops there, so the backward covers the segment's positions only. `context_grad: true`
back-propagates through the context as well (the whole window's backward). Both score identically.

rms: the gradient statistics come from the first `n_stat_segments` segments of the prepare split,
cached by the harness (keyed by model, data, protocol and the adapted parameters), so `tta-bench
prepare` computes them once.

Low-rank (`params: lora`, SPEC 3): the adapted parameters are low-rank adapters (lora.py: W + (alpha /
rank) B A on the linear layers `lora_targets` names, A seeded by the cell's seed, B = 0), the base
weights frozen; a reset puts B back to 0 (and A to its init), so the update is dropped; `decay` pulls
A and B toward those values, i.e. the update B A toward 0. rms statistics are gathered, like the first
step's gradient, with the adapter at its start: there B = 0, so A's gradient B^T dL/dh is exactly 0
and its ms is 0; A's denominator is then eps alone, i.e. A takes SGD steps of size lr / eps, while B's
are normalised by real statistics. The backward runs through the whole network to reach the early
layers' adapters, but computes no gradient of a base weight (counted by FlopCounterMode as it runs)."""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from tta_bench.api.errors import TTABenchError
from tta_bench.api.method import Method
from tta_bench.protocol.flops import dispatch_flops

from .lanes import LaneWeights, by_shape, charge_lanes
from .lora import DEFAULT_TARGETS, LoraAdapter, lora_problems
from .selection import parse_selection, select_parameters
from .update import DEFAULT_LR, DynamicEvaluation, rms_statistics, score_with_graph, take_scored, update_rule_problems


class DynamicEvalBase(Method):
    """Dynamic evaluation: an SGD or RMS step on each segment after scoring it (registered by subclasses)."""

    @dataclass
    class Params:
        variant: Literal["sgd", "rms"] = "sgd"
        lr: float | None = None  # sgd: step size; rms: step per unit of normalised gradient; null: DEFAULT_LR[variant]
        decay: float = 0.0  # pull toward the original weights at every step
        eps: float = 1e-3  # rms: added to sqrt(ms), so a parameter with tiny gradients never takes a huge step
        params: str = "all"  # all | last N (blocks) | a regex on parameter names | lora (low-rank adapters)
        n_stat_segments: int = 100  # rms: prepare-split segments for the gradient statistics
        context_grad: bool = False  # also back-propagate through the context (else its KV cache is fixed)
        lora_rank: int = 8  # params lora: the adapters' rank
        lora_alpha: float = 16.0  # params lora: the update is (lora_alpha / lora_rank) * B A
        lora_targets: str = DEFAULT_TARGETS  # params lora: a regex on the names of the linear layers adapted

        def __post_init__(self):
            if self.lr is None:
                self.lr = DEFAULT_LR.get(self.variant)

        def problems(self) -> list[str]:
            out = update_rule_problems(self.lr, self.decay, self.eps, self.n_stat_segments)
            return out + selection_problems(self.params, self.lora_rank, self.lora_alpha, self.lora_targets)

    quick_params = {"n_stat_segments": 2}

    @classmethod
    def adapts_at_test_time(cls, params) -> bool:
        return True  # a gradient step on every scored segment

    def __init__(self, lm, params, seed=0, protocol=None):
        super().__init__(lm, params, seed, protocol)
        p = self.params
        self.names, tensors, self.adapter = adapted_parameters(lm.model, p, seed)
        embedding = None
        if self.adapter is None:
            try:
                embedding = lm.model.get_input_embeddings()
            except (AttributeError, NotImplementedError):
                pass  # the plain autograd gradient then
        self.dyn = DynamicEvaluation(tensors, p.variant, p.lr, p.decay, p.eps, embedding)
        self._scored = None  # the last scored segment (update.Scored), its graph attached
        self._segment_flops: dict = {}
        self.lanes: LaneWeights | None = None  # protocol.lanes > 1: each lane's adapted tensors

    def prepare(self, data):
        if self.params.variant != "rms":
            return

        def segment_grads(seg):
            with torch.enable_grad():
                logprobs = self._logprobs(seg.ids, seg.n)
            return self.dyn.nll_grads(logprobs, seg.targets)

        p = self.params
        self.dyn.use_stats(rms_statistics(data, self.protocol, p.n_stat_segments, self._stats_key(), segment_grads))

    def _stats_key(self) -> dict:
        """What the rms statistics depend on besides the model, data and protocol (their cache key)."""
        p, lora = self.params, {}
        if self.adapter is not None:  # A's init (the seed) and the scale change every gradient
            lora = {"lora": [p.lora_rank, p.lora_alpha, self.seed]}
        return {"params": self.names, "context_grad": p.context_grad, **lora}

    def reset(self):
        self.dyn.reset()
        self._scored = None

    def score(self, seg):
        self._scored, scores = score_with_graph(lambda s: self._logprobs(s.ids, s.n), seg)
        return scores

    def _logprobs(self, ids, n):
        """(n, V) log-probabilities with the graph the update differentiates (see the module docstring)."""
        lm = self.lm
        if self.params.context_grad or ids.shape[1] == n:
            # lm.forward, never a pass of the base model shared across cells: with an adapter this is
            # not the base model, and a hook is no parameter whose version could tell
            self._count_adapter(ids.shape)
            return F.log_softmax(lm.logits(lm.forward(ids).last_hidden_state[0, -n:]), dim=-1)
        context = ids[:, :-n]  # an ordinary forward of the context, counted by fvcore
        self._count_adapter(context.shape)
        with torch.no_grad():
            out = lm.forward(context, use_cache=True)
        kv = out.cache if hasattr(out, "cache") else out.past_key_values  # transformers >= 5.24 | older
        # The segment's forward attends to the cached keys and values: fvcore cannot trace it, so FlopCounterMode counts
        # it (matmuls and attention, halved: the same convention), once per shape; the adapter's part apart.
        key = (tuple(ids.shape), n)
        counting = lm.ledger.enabled
        if counting and key not in self._segment_flops:  # counted on a copy, thrown away: see DynamicEvaluation.grad
            scratch = copy.deepcopy(kv)  # the forward appends to the cache it is given
            with self.adapter.disabled() if self.adapter is not None else contextlib.nullcontext():
                self._segment_flops[key] = dispatch_flops(lambda: self._segment(ids[:, -n:], scratch))
        h = self._segment(ids[:, -n:], kv)
        if counting:
            lm.ledger.add("forward.body", self._segment_flops[key])
            self._count_adapter((ids.shape[0], n))
        return F.log_softmax(lm.logits(h), dim=-1)

    def _count_adapter(self, shape):
        """The adapter's part of a body forward on `shape` (the LM's trace and the segment's count see the base only)."""
        if self.adapter is not None:
            self.adapter.count_forward(self.ledger, shape)

    def _segment(self, ids, kv):
        kw = "cache" if "cache" in inspect.signature(self.lm.body.forward).parameters else "past_key_values"
        return self.lm.body(input_ids=ids, use_cache=True, **{kw: kv}).last_hidden_state[0]

    def adapt(self, seg):
        scored, self._scored = take_scored(self._scored, seg, "dynamic-eval"), None
        self.dyn.step_on(scored, seg.targets, self.ledger)

    # -- lanes: the adapted tensors stacked per lane, one vmapped forward per input shape (lanes.py) ----
    @classmethod
    def runs_in_lanes(cls, params) -> bool:
        return True

    def open_lanes(self, n):
        self.lanes = LaneWeights(self.dyn, n, self.lm.model, self.names, self.adapter)
        self._lane_costs: dict = {}
        self._lane_scored: list = []

    def reset_lane(self, lane):
        self.lanes.reset(lane)

    def score_lanes(self, segs):
        out, self._lane_scored = [None] * len(segs), []
        for group, lanes, ids, n in by_shape([s.lane for s in segs], [s.ids for s in segs], [s.n for s in segs]):
            leaves = self.lanes.take(lanes)
            with torch.enable_grad():
                with self.ledger.paused():
                    logprobs = self.lanes.logprobs(leaves, ids, n, self._logprobs)
                charge_lanes(
                    self._lane_costs, (tuple(ids.shape[1:]), n), self.lm, len(group), lambda: self._one_lane(ids[0], n)
                )
            self._lane_scored.append((group, lanes, leaves, logprobs))
            for j, i in enumerate(group):
                out[i] = logprobs[j].detach()
        return out

    def _one_lane(self, ids, n):
        """The one-lane path's forward and backward on an input of this shape (what it charges, lanes.py)."""
        logprobs = self._logprobs(ids, n)
        self.dyn.nll_grads(
            logprobs, torch.zeros(n, dtype=torch.long, device=ids.device), self.ledger, (tuple(ids.shape), n)
        )

    def adapt_lanes(self, segs):
        for group, lanes, leaves, logprobs in self._lane_scored:
            targets = torch.stack([segs[i].targets for i in group])
            loss = F.nll_loss(logprobs.flatten(0, 1), targets.flatten(), reduction="sum") / targets.shape[1]
            self.lanes.step(lanes, leaves, torch.autograd.grad(loss, leaves), self.ledger)
        self._lane_scored = []

    def close(self):
        """Original weights and requires_grad flags back: the loaded model is shared by later cells."""
        self.lanes, self._lane_scored = None, []
        self._scored = None
        self.dyn.close()
        if self.adapter is not None:
            self.adapter.remove()


def selection_problems(spec: str, rank: int, alpha: float, targets: str) -> list[str]:
    """Config problems of `params` (all | last N | a regex | lora) and, for lora, of the adapter's settings."""
    if spec.strip().lower() == "lora":
        return lora_problems(rank, alpha, targets)
    try:
        parse_selection(spec)
    except TTABenchError as e:
        return [str(e)]
    return []


def adapted_parameters(model, p, seed: int) -> tuple[list[str], list[torch.Tensor], LoraAdapter | None]:
    """(names, tensors, adapter) of what `p.params` adapts: the model's own parameters it selects
    (adapter None), or with `lora` the A and B of new low-rank adapters on the model (lora.py)."""
    if p.params.strip().lower() == "lora":
        adapter = LoraAdapter(model, p.lora_targets, p.lora_rank, p.lora_alpha, seed)
        return [f"{n}.lora_{ab}" for n in adapter.names for ab in "AB"], adapter.params, adapter
    named = select_parameters(model, p.params)
    return [n for n, _ in named], [t for _, t in named], None
