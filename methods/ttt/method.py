"""`ttt-nn`, test-time training on nearest neighbours (Hardt & Sun 2024) in the score-first form SPEC
3 asks for, and its control `ttt-random`.

After a segment is scored, `ttt-nn` embeds the scored text with the base model (a forward of the
segment's input, the context it was scored with, adapters off: the mean final hidden state over the
segment's rows, as the datastore's chunks are keyed, datastore.py), finds the k nearest prepare-split
chunks with faiss, and takes one SGD step on each, nearest first, on the chunk's mean NLL (the chunk
read alone, behind the token before it); with `self_step` a last step on the scored segment itself
(with its context). The query never holds a token that is not yet scored: Hardt & Sun choose the
neighbours with the very text they then evaluate, which the protocol forbids. Weights go back at every
reset (per document under reset document).

`ttt-random` takes as many steps, on chunks drawn uniformly at random from the same datastore, seeded
by the cell's seed and the segment's position in its document (so a document scores the same wherever
it stands in the stream and however documents are sharded), so ttt-nn's gain over it is what choosing
by the evaluated text bought.

`params` is dynamic evaluation's: all | last N | a regex, adapted in a private copy of the model (the
shared one stays the base model the query needs), or lora: low-rank adapters on the shared model
(_common/lora.py), switched off for the query.

Cost (SPEC 5): every forward through the LM is counted (scoring, the query, each step's forward),
each step's backward and update by the ledger (DynamicEvaluation), the search analytically under
`search.ttt` (n_keys * d multiply-adds, plus the n * d adds that pool the query).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from tta_bench.api.method import Method
from tta_bench.api.registry import register_method
from tta_bench_methods._common.dyneval import adapted_parameters, selection_problems
from tta_bench_methods._common.lanes import LaneWeights, by_shape, charge_lanes
from tta_bench_methods._common.lora import DEFAULT_TARGETS
from tta_bench_methods._common.update import DynamicEvaluation

from .datastore import ChunkStore

SEED_MIX = 1_000_003  # mixes (seed, position) into one generator seed


class TestTimeTraining(Method):
    """A fine-tuning step on each of `k` prepare-split chunks after every scored segment; `choose` picks them."""

    requires = ("faiss-cpu",)

    @dataclass
    class Params:
        k: int = 8  # chunks stepped on after each scored segment
        lr: float = 1e-3  # SGD step size of every step
        params: str = "all"  # all | last N (blocks) | a regex on parameter names | lora (low-rank adapters)
        self_step: bool = False  # a last step on the scored segment itself
        chunk_len: int = 128  # tokens per datastore chunk
        datastore_tokens: Optional[int] = 100_000  # prepare-split tokens chunked (None: all)
        lora_rank: int = 8  # params lora: the adapters' rank
        lora_alpha: float = 16.0  # params lora: the update is (lora_alpha / lora_rank) * B A
        lora_targets: str = DEFAULT_TARGETS  # params lora: a regex on the names of the linear layers adapted

        def problems(self) -> list[str]:
            out = [f"{f} must be >= 1, got {getattr(self, f)}" for f in ("k", "chunk_len") if getattr(self, f) < 1]
            if not self.lr > 0:
                out.append(f"lr must be > 0, got {self.lr}")
            if self.datastore_tokens is not None and self.datastore_tokens < 1:
                out.append(f"datastore_tokens must be >= 1 or null, got {self.datastore_tokens}")
            return out + selection_problems(self.params, self.lora_rank, self.lora_alpha, self.lora_targets)

    quick_params = {"k": 2, "chunk_len": 16, "datastore_tokens": 800}
    check_variants = [{"params": "lora"}, {"params": "last 1", "self_step": True}]

    @classmethod
    def adapts_at_test_time(cls, params) -> bool:
        return True  # steps after every scored segment (ttt-random: on random chunks, chosen at test time)

    def __init__(self, lm, params, seed=0, protocol=None):
        super().__init__(lm, params, seed, protocol)
        p = self.params
        lora = p.params.strip().lower() == "lora"
        self.model = None if lora else copy.deepcopy(lm.model)  # None: the shared model, adapters on it
        self.names, tensors, self.adapter = adapted_parameters(lm.model if lora else self.model, p, seed)
        embedding, originals = None, None
        if not lora:  # a reset copies the shared (base) weights back: no second copy kept
            embedding = self.model.get_input_embeddings()
            named = dict(lm.model.named_parameters())
            originals = [named[n].detach() for n in self.names]
        # sgd without decay (eps unused): one plain step per chunk, as Hardt & Sun take
        self.dyn = DynamicEvaluation(tensors, "sgd", p.lr, 0.0, 1.0, embedding, originals)
        self.store: ChunkStore | None = None
        self.info: dict = {}
        self.lanes: LaneWeights | None = None  # protocol.lanes > 1: each lane's adapted tensors

    def prepare(self, data):
        from tta_bench.protocol.evaluate import Protocol

        p = self.params
        stream = data.load(limit_tokens=p.datastore_tokens)
        self.store = ChunkStore.build(data, stream, self.protocol or Protocol(), p.chunk_len)
        self.info = {"n_chunks": self.store.n, "dim": self.store.d, "tokens": stream.n_tokens}

    def reset(self):
        self.dyn.reset()

    @torch.no_grad()
    def score(self, seg):
        return self._logprobs(seg.ids, seg.n)

    def _logprobs(self, ids, n):
        """(n, V) log-probabilities of the last n positions with the adapted weights (graph if grad is on)."""
        # lm.forward, never a pass of the base model shared across cells: with an adapter this is not
        # the base model, and a hook is no parameter whose version could tell
        h = self.lm.forward(ids, model=self.model).last_hidden_state[0, -n:]
        if self.adapter is not None:
            self.adapter.count_forward(self.ledger, tuple(ids.shape))
        return F.log_softmax(self.lm.logits(h, model=self.model), dim=-1)

    def adapt(self, seg):
        self.train_on(self.choose(seg))
        if self.params.self_step:
            self._step(seg.ids, seg.targets)

    def train_on(self, chunk_ids: list[int]) -> None:
        """One step on each chunk, in the order given."""
        for i in chunk_ids:
            chunk = self.store.chunks[i]
            self._step(chunk.inputs[None].to(self.lm.device), chunk.targets.to(self.lm.device))

    def choose(self, seg) -> list[int]:
        """The chunks to step on after `seg` was scored, in order."""
        raise NotImplementedError

    def _step(self, ids, targets):
        """One SGD step on the mean NLL of `targets`, the last len(targets) positions of `ids`."""
        self.dyn.step(self._grads(ids, targets), self.ledger)

    def _grads(self, ids, targets):
        with torch.enable_grad():
            logprobs = self._logprobs(ids, len(targets))
            return self.dyn.nll_grads(logprobs, targets, self.ledger, key=(tuple(ids.shape), len(targets)))

    # -- lanes: the adapted tensors stacked per lane, each step one vmapped forward per shape (lanes.py) ----
    @classmethod
    def runs_in_lanes(cls, params) -> bool:
        return True

    def open_lanes(self, n):
        self.lanes = LaneWeights(self.dyn, n, self.model or self.lm.model, self.names, self.adapter)
        self._lane_costs: dict = {}

    def reset_lane(self, lane):
        self.lanes.reset(lane)

    @torch.no_grad()
    def score_lanes(self, segs):
        out = [None] * len(segs)
        for group, lanes, ids, n in by_shape([s.lane for s in segs], [s.ids for s in segs], [s.n for s in segs]):
            with self.ledger.paused():
                logprobs = self.lanes.logprobs(self.lanes.take(lanes), ids, n, self._logprobs)
            key = ("score", tuple(ids.shape[1:]), n)
            charge_lanes(self._lane_costs, key, self.lm, len(group), lambda: self._logprobs(ids[0], n))
            for j, i in enumerate(group):
                out[i] = logprobs[j]
        return out

    def adapt_lanes(self, segs):
        chosen = [self.choose(s) for s in segs]  # each lane's chunks, chosen as one lane chooses them
        for j in range(max(len(c) for c in chosen)):
            chunks = [(s.lane, self.store.chunks[c[j]]) for s, c in zip(segs, chosen) if j < len(c)]
            self._lane_steps(
                [(lane, c.inputs[None].to(self.lm.device), c.targets.to(self.lm.device)) for lane, c in chunks]
            )
        if self.params.self_step:
            self._lane_steps([(s.lane, s.ids, s.targets) for s in segs])

    def _lane_steps(self, items):
        """One SGD step per (lane, ids, targets), each lane on its own tensors, one forward per shape."""
        lanes_of, inputs, targets_of = zip(*items)
        for group, lanes, ids, n in by_shape(lanes_of, inputs, [len(t) for t in targets_of]):
            targets, leaves = torch.stack([targets_of[i] for i in group]), self.lanes.take(lanes)
            with torch.enable_grad():
                with self.ledger.paused():
                    logprobs = self.lanes.logprobs(leaves, ids, n, self._logprobs)
                loss = F.nll_loss(logprobs.flatten(0, 1), targets.flatten(), reduction="sum") / n
                grads = torch.autograd.grad(loss, leaves)
                charge_lanes(
                    self._lane_costs,
                    ("step", tuple(ids.shape[1:]), n),
                    self.lm,
                    len(group),
                    lambda: self._grads(ids[0], targets[0]),
                )
            self.lanes.step(lanes, leaves, grads, self.ledger)

    def close(self):
        """The shared model as found: adapters removed (lora), the private copy dropped."""
        self.lanes = None
        self.dyn.close()
        if self.adapter is not None:
            self.adapter.remove()
        self.model = None


@register_method("ttt-nn")
class TTTNearest(TestTimeTraining):
    """Test-time training on nearest neighbours, score first: after each scored segment, a step on
    each of the k prepare-split chunks nearest to it (Hardt & Sun 2024)."""

    claim = (
        "20 neighbours, one step each, drastically improve over 20 Pile tasks and narrow the gap between GPT-2"
        " and a 10x larger GPT-Neo (Hardt & Sun 2024; neighbours chosen with the evaluated text itself)"
    )

    @classmethod
    def control(cls, params):
        return {"method": "ttt-random", "params": {k: getattr(params, k) for k in cls.param_fields()}}

    def choose(self, seg):
        query = self.embed(seg)
        ids, flops = self.store.nearest(query, self.params.k)
        self.ledger.add("search.ttt", flops + seg.n * self.store.d)
        return ids

    @torch.no_grad()
    def embed(self, seg) -> torch.Tensor:
        """The base model's mean final hidden state over the segment's rows (its input as scored)."""
        off = self.adapter.disabled() if self.adapter is not None else contextlib.nullcontext()
        with off:  # the base model: a pass of it shared across cells may serve this
            h = self.lm.hidden(seg.ids)[0, -seg.n :]
        return h.float().mean(0)


@register_method("ttt-random")
class TTTRandom(TestTimeTraining):
    """ttt-nn's control: as many steps, on chunks drawn at random from the same datastore."""

    def choose(self, seg):
        return self.store.drawn(self.params.k, self.seed * SEED_MIX + seg.start)
