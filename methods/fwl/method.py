"""Fast Weight Layers (Clark et al. 2022; SPEC section 3), and FWL combined with dynamic evaluation.

A small block on the base model's final hidden states whose weights, at every position, have taken one
SGD step on the losses of all earlier tokens (computed exactly, as linear attention; `block.py`).
`prepare` loads the block from `checkpoint`, else from the harness's cache of prepared state (keyed by
base model, training configuration and prepare data), else meta-trains it on the prepare split
(`train.py`; `tta-bench prepare` does it ahead of time).

fast_state (scope.py):
- `document`: the fast-weight state carries from segment to segment (until reset: each document under
  reset=document, never under reset=never). A segment's new positions see every earlier position's
  gradient; the last one's target arrives in adapt(), which adds it to the state.
- `window`: the state starts empty for every segment and covers its whole input window (context included).

`timescales` (decayed.py): every earlier position's gradient is discounted by a learned gamma^(distance),
one step size per timescale, so a state carried through a long document keeps steps of the size training
saw; train it with the state carried (`train_fast_state: document`, the default when fast_state is document).
`recurrent` (block.py): each chunk's gradients are taken at the fast weights the earlier chunks left, so a
token already learned stops adding to the state; `chunk` is then part of the method, in training too.
For whole documents use `fast_state: document, recurrent: true`: on smollm2-135m it beat `window` and the
decayed memory in and out of domain (benchmarks/fwl_memory*.yaml); `window` stays the default because,
trained with the larger budget, it lost the first 128 tokens of each document to `window` (by 0.08 nats).

`gate: bayes` (gate.py, BayesGate): the block's distribution and the base model's, mixed by their posterior weights
on the document's earlier tokens (with a fixed share, `gate_share`, so the weights can move back), so a
block whose prepare-split style does not fit the text (out of domain) gives way to the base model within
a few tokens, and takes over again where its fast weights have learned the document.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from tta_bench.api.errors import TTABenchError
from tta_bench.api.method import Method
from tta_bench.api.registry import register_method
from tta_bench.checks.separation import stream_runs
from tta_bench_methods._common.lanes import LaneWeights
from tta_bench_methods._common.update import (
    DEFAULT_LR,
    DynamicEvaluation,
    rms_statistics,
    score_with_graph,
    take_scored,
    update_rule_problems,
)

from .gate import make_gate
from .scope import make_scope
from .train import (
    FORMAT,
    TrainConfig,
    load_checkpoint,
    recorded_training_runs,
    save_checkpoint,
    train_block,
    train_fields,
)

# The checks' and tests' setting: a tiny block whose fast path moves its scores far beyond their tolerances
# (U at the head's scale, inner-loss normaliser 1/8).
QUICK = {
    "size": 8,
    "u_scale": 1.0,
    "norm": 0.125,
    "train_tokens": 600,
    "val_tokens": 100,
    "train_window": 32,
    "train_seq_len": 64,
    "train_steps": 4,
    "eval_every": 0,
}


def static_control(params) -> dict:
    """FWL's control (SPEC 3): the same block trained the same way, in the same reading order, with its step
    sizes fixed at 0 (timescales and recurrence aside: without fast weights they change nothing), behind
    the same gate. Document order is named only when it is used: fwl-static reads pieces shuffled by default."""
    fields = train_fields(params)
    same = {k: v for k, v in fields.items() if k not in ("fast", "train_fast_state", "timescales", "recurrent")}
    if fields["train_fast_state"] == "document":
        same["train_fast_state"] = "document"
    else:
        del same["train_lanes"]  # without a carried state there are no lanes
    return {
        "method": "fwl-static",
        "params": same if params.gate == "none" else {**same, "gate": params.gate, "gate_share": params.gate_share},
    }


@register_method("fwl")
class FastWeightLayers(Method):
    """Fast Weight Layers (Clark et al. 2022): a meta-learned head whose weights take an SGD step on every earlier token."""

    claim = (
        "the gains of dynamic evaluation for relatively little extra compute and memory; most on long documents,"
        " rare and repeated tokens (Clark et al.)"
    )
    claim_cost = ("relatively little extra compute (Clark et al.; read here as at most 1.5x)", "<=", 1.5)
    claim_setting = "the base model and the fast weights trained jointly, to convergence; long documents (PG-19, WikiText-103) (Clark et al. 2022)"

    @dataclass
    class Params(TrainConfig):
        fast_state: Literal["document", "window"] = "window"  # carried through the document, or per window
        chunk: int = 128  # linear attention chunk: quadratic inside, a carried state across
        checkpoint: str = ""  # a trained block (.safetensors); empty: the cache, else train in prepare
        gate: Literal["none", "bayes"] = "none"  # bayes: mixed with the base model by posterior weights (BayesGate)
        gate_share: float = 0.001  # fixed share of the gate's weights per token (0: the plain Bayesian mixture)

        def problems(self) -> list[str]:
            out = TrainConfig.problems(self)
            if self.chunk < 1:
                out.append(f"chunk must be >= 1, got {self.chunk}")
            if not 0 <= self.gate_share < 1:
                out.append(f"gate_share must be in [0, 1), got {self.gate_share}")
            return out

    quick_params = QUICK
    # decayed and chunk-recurrent fast weights, carried through documents
    check_variants = [
        {"fast_state": "document", "timescales": [8.0, 64.0]},
        {"fast_state": "document", "recurrent": True, "chunk": 8},
    ]

    @classmethod
    def adapts_at_test_time(cls, params) -> bool:
        return params.fast or params.gate != "none"  # the gate's weights follow the document too

    @classmethod
    def control(cls, params):
        return static_control(params) if params.fast else None

    def __init__(self, lm, params, seed=0, protocol=None):
        super().__init__(lm, params, seed, protocol)
        self.block = None
        self.scope = None  # the fast weights' reach (scope.py), once the block is there
        self.info: dict = {}
        self.model = None  # a private copy of the base model when its top blocks were fine-tuned
        self.gate = make_gate(params)

    @classmethod
    def given_files(cls, params):
        return [params.checkpoint] if params.checkpoint else []

    @classmethod
    def given_data(cls, params):
        if not params.checkpoint:
            return []
        return [
            (
                f"FWL checkpoint {params.checkpoint} (its recorded training data)",
                recorded_training_runs(params.checkpoint),
            )
        ]

    # -- prepare ------------------------------------------------------------------------------------
    def prepare(self, data):
        p = self.params
        if p.checkpoint:
            block, base, info = load_checkpoint(p.checkpoint, self.lm.device)
            if info.get("model") != self.lm.fingerprint:
                raise TTABenchError(
                    f"FWL checkpoint {p.checkpoint} was trained on model {info.get('model_name')}"
                    f" ({info.get('model')}), not {self.lm.name} ({self.lm.fingerprint}); train one for it"
                )
        else:
            stream = data.load(limit_tokens=p.train_tokens)

            def train(folder):
                block, base, info = train_block(self.lm, p, stream, data, progress=data.progress, log=data.log)
                save_checkpoint(
                    folder / "block.safetensors", block, base, info, stream_runs([d.ids for d in stream.docs])
                )
                return {
                    k: info[k]
                    for k in ("train_seconds", "train_tokens", "steps", "stopped_by", "best_step", "val_nll", "history")
                }

            train_key = train_fields(p)
            # fields added later are absent at their old behaviour, so blocks cached before them keep their key
            if train_key.pop("recurrent"):
                train_key.update(recurrent=True, chunk=p.chunk)
            if train_key["train_lanes"] == 1 or train_key["train_fast_state"] == "window":
                del train_key["train_lanes"]
            folder = data.cached("fwl-block", stream, {"format": FORMAT, "train": train_key}, train)
            block, base, info = load_checkpoint(folder / "block.safetensors", self.lm.device)
        self._use(block, base, info)

    def _use(self, block, base_params: dict, info: dict):
        if block.cfg.d_in != self.lm.hidden_size or block.cfg.vocab != self.lm.vocab_size:
            raise TTABenchError(
                f"FWL block is for hidden size {block.cfg.d_in} and vocabulary {block.cfg.vocab},"
                f" not {self.lm.name}'s {self.lm.hidden_size} and {self.lm.vocab_size}; train one for it"
            )
        self.block = block.to(self.lm.device, torch.float32).eval()  # float32 whatever the base's dtype
        for q in self.block.parameters():
            q.requires_grad_(False)
        self.info, self._base = info, base_params
        if base_params:  # the fine-tuned top blocks live in a private copy: the loaded model is shared
            self.model = copy.deepcopy(self.lm.model)
            named = dict(self.model.named_parameters())
            with torch.no_grad():
                for k, v in base_params.items():
                    named[k].copy_(v)
        self.scope = make_scope(self.params, self.block, self.lm.device)

    # -- protocol -----------------------------------------------------------------------------------
    def reset(self):
        if self.scope is not None:
            self.scope.reset()
        self.gate.reset()

    def _hidden(self, ids):
        return self.lm.hidden(ids, model=self.model)  # the private copy when the top blocks were fine-tuned

    def _logprobs(self, seg, hidden=None, scope=None, gate=None):
        """(n, V) log-probabilities of the segment's targets (gated: mixed with the base model's); records
        the block's forward in the ledger. A lane gives its base hidden states, fast state and gate."""
        if self.block is None:
            raise TTABenchError("fwl: score() before prepare(); the block is trained or loaded in prepare")
        scope = self.scope if scope is None else scope
        gate = self.gate if gate is None else gate
        n, L = seg.n, seg.ids.shape[1]
        h = scope.new_positions(self._hidden(seg.ids) if hidden is None else hidden, n)
        base = self.lm.logits(h)
        lp = F.log_softmax(scope.logits(h, base, seg.ids, n, self.ledger), -1)
        return gate.mix(lp, base[0, -n:], seg.ids[0, L - n + 1 :])

    @torch.no_grad()
    def score(self, seg):
        return self._logprobs(seg)

    @torch.no_grad()
    def adapt(self, seg):
        self._commit(seg, self.scope, self.gate)

    def _commit(self, seg, scope, gate):
        scope.commit(seg.targets[-1:].view(1, 1), self.ledger)
        gate.commit(int(seg.targets[-1]))

    # -- lanes: the base forward batched, a fast state and a gate per lane, the block run per lane ----
    @classmethod
    def runs_in_lanes(cls, params) -> bool:
        return True

    def open_lanes(self, n):
        self._lane_states = [(self.scope, self.gate)] + [
            (make_scope(self.params, self.block, self.lm.device), make_gate(self.params)) for _ in range(n - 1)
        ]

    def reset_lane(self, lane):
        scope, gate = self._lane_states[lane]
        scope.reset()
        gate.reset()

    @torch.no_grad()
    def score_lanes(self, segs):
        hs = self.lm.hidden_lanes([s.ids for s in segs], model=self.model)
        return [self._logprobs(s, h.unsqueeze(0), *self._lane_states[s.lane]) for s, h in zip(segs, hs)]

    @torch.no_grad()
    def adapt_lanes(self, segs):
        for s in segs:
            self._commit(s, *self._lane_states[s.lane])

    def close(self):
        self.model = None


@register_method("fwl-static")
class FWLStatic(FastWeightLayers):
    """Control for fwl (SPEC 3): the same block trained the same way with its step sizes fixed at 0 from the start."""

    claim = ""

    @dataclass
    class Params(FastWeightLayers.Params):
        fast: bool = False

        def problems(self) -> list[str]:
            out = FastWeightLayers.Params.problems(self)
            if self.fast:
                out.append("fwl-static is the block with step sizes fixed at 0; use fwl for fast weights")
            return out


@register_method("fwl-dynamic-eval")
class FWLDynamicEval(FastWeightLayers):
    """FWL plus dynamic evaluation: after scoring, an SGD/RMS step on the segment's NLL over the FW block's (or all) weights."""

    claim_cost = None  # FWL's cost claim is for FWL alone

    @dataclass
    class Params(FastWeightLayers.Params):
        dyn_params: Literal["block", "all"] = (
            "block"  # the block's weights (not its step sizes), or those and the base's
        )
        dyn_variant: Literal["sgd", "rms"] = "sgd"
        dyn_lr: float | None = None  # null: DEFAULT_LR[dyn_variant], as dynamic-eval's lr
        dyn_decay: float = 0.0
        dyn_eps: float = 1e-3
        n_stat_segments: int = 100  # rms: prepare-split segments for the gradient statistics

        def __post_init__(self):
            if self.dyn_lr is None:
                self.dyn_lr = DEFAULT_LR.get(self.dyn_variant)

        def problems(self) -> list[str]:
            return FastWeightLayers.Params.problems(self) + update_rule_problems(
                self.dyn_lr, self.dyn_decay, self.dyn_eps, self.n_stat_segments, prefix="dyn_"
            )

    quick_params = {**QUICK, "n_stat_segments": 2}

    @classmethod
    def adapts_at_test_time(cls, params) -> bool:
        return True  # dynamic evaluation, whether or not the block has fast weights

    @classmethod
    def control(cls, params):
        return static_control(params)

    def __init__(self, lm, params, seed=0, protocol=None):
        super().__init__(lm, params, seed, protocol)
        self.dyn = None
        self._scored = None  # the last scored segment (tta_bench_methods._common.update.Scored)

    def prepare(self, data):
        super().prepare(data)
        p = self.params
        named = [(f"block.{n}", q) for n, q in self.block.slow_parameters()]
        if p.dyn_params == "all":
            named += [(f"model.{n}", q) for n, q in (self.model or self.lm.model).named_parameters()]
        self._dyn_names = [n for n, _ in named]
        self.dyn = DynamicEvaluation([q for _, q in named], p.dyn_variant, p.dyn_lr, p.dyn_decay, p.dyn_eps)
        if p.dyn_variant == "rms":
            self._gradient_stats(data)

    def _gradient_stats(self, data):
        p = self.params

        def segment_grads(seg):
            if seg.start == 0:
                FastWeightLayers.reset(self)
            with torch.enable_grad():
                logprobs = self._logprobs(seg)
            grads = self.dyn.nll_grads(logprobs, seg.targets)
            FastWeightLayers.adapt(self, seg)  # the state and gate take the segment's last target
            return grads

        weights = [t for _, t in sorted(self.block.state_dict().items())] + [t for _, t in sorted(self._base.items())]
        key = {"block": _digest(weights), "fast_state": p.fast_state, "chunk": p.chunk, "dyn_params": p.dyn_params}
        if p.gate != "none":
            key.update(gate=p.gate, gate_share=p.gate_share)
        try:
            with self.ledger.paused():
                self.dyn.use_stats(rms_statistics(data, self.protocol, p.n_stat_segments, key, segment_grads))
        finally:
            FastWeightLayers.reset(self)

    def reset(self):
        super().reset()
        if self.dyn is not None:
            self.dyn.reset()
        self._scored = None

    def score(self, seg):
        self._scored, scores = score_with_graph(self._logprobs, seg)
        return scores

    def adapt(self, seg):
        scored, self._scored = take_scored(self._scored, seg, "fwl-dynamic-eval"), None
        super().adapt(seg)  # first the last position joins the state, with the weights the scoring used
        self.dyn.step_on(scored, seg.targets, self.ledger)

    # -- lanes: a fast state, a gate and adapted weights per lane; each lane's block (and with
    # dyn_params all, its base forward) runs with its own weights (lanes.LaneWeights.call) ----------
    def open_lanes(self, n):
        super().open_lanes(n)
        held = torch.nn.ModuleDict({"block": self.block, "model": self.model or self.lm.model})
        self.lanes = LaneWeights(self.dyn, n, held, self._dyn_names)
        self._lane_scored = []

    def reset_lane(self, lane):
        super().reset_lane(lane)
        self.lanes.reset(lane)

    def score_lanes(self, segs):
        if self.params.dyn_params == "block":  # the base is frozen: one batched forward
            hs = [h.unsqueeze(0) for h in self.lm.hidden_lanes([s.ids for s in segs], model=self.model)]
        else:
            hs = [None] * len(segs)
        out, self._lane_scored = [], []
        for s, h in zip(segs, hs):
            leaves = self.lanes.take([s.lane])
            with torch.enable_grad():
                logprobs = self.lanes.call([t[0] for t in leaves], self._logprobs, s, h, *self._lane_states[s.lane])
            self._lane_scored.append((s, leaves, logprobs))
            out.append(logprobs.detach())
        return out

    def adapt_lanes(self, segs):
        for s, leaves, logprobs in self._lane_scored:
            with torch.no_grad():  # the last position joins the lane's state, with the weights it scored with
                self.lanes.call([t[0] for t in leaves], self._commit, s, *self._lane_states[s.lane])
            key = (tuple(s.ids.shape), s.n)
            grads = self.dyn.nll_grads(logprobs, s.targets, self.ledger, key, params=leaves)
            self.lanes.step([s.lane], leaves, grads, self.ledger)
        self._lane_scored = []

    def close(self):
        self._scored, self.lanes, self._lane_scored = None, None, []
        if self.dyn is not None:
            self.dyn.close()
        super().close()


def _digest(tensors) -> str:
    """sha256 of tensors' bytes: what the rms statistics of fwl-dynamic-eval were computed with."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
