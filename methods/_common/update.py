"""The dynamic-evaluation update rule (Krause et al. 2018, 2019; SPEC section 3), reusable by any method.

    from tta_bench_methods._common.selection import select_parameters
    from tta_bench_methods._common.update import DynamicEvaluation, rms_statistics, score_with_graph

    named = select_parameters(model, "last 2")         # "all" | "last N" (blocks) | a name regex
    dyn = DynamicEvaluation([p for _, p in named], variant="rms", lr=1e-4, decay=0.0, eps=1e-5,
                            embedding=model.get_input_embeddings())  # optional: a cheaper exact gradient
    dyn.use_stats(dyn.mean_square_root(grads for each prepare segment))  # rms only: sqrt(ms), ms = mean of g^2
    ...
    grads = dyn.grad(loss)                             # d loss / d params (autograd.grad, no .grad kept)
    dyn.step(grads)                                    # the update below, in place
    scored, scores = score_with_graph(logprobs_of, seg)  # in score(): log-probabilities, graph kept
    dyn.step_on(scored, seg.targets, ledger)           # in adapt(): one update on the segment's mean NLL
    dyn.reset()                                        # weights back to the originals
    dyn.close()                                        # reset, and give requires_grad back

Update rules, W0 the values when the object was made (the one copy kept, of these parameters only;
bfloat16 or float16 weights are updated through float32 copies, cast into them after each step):
- sgd: W <- W - lr * g + decay * (W0 - W)
- rms: W <- W - lr * g / (sqrt(ms) + eps) - decay * sqrt(ms) * (W - W0)

The parameters are updated in place, so every forward through the model sees the adapted weights;
the owner must call `reset()` (or `close()`) before the model is used by anyone else. Making the
object turns requires_grad on for its parameters; `close()` restores the flags it found.

Input embedding: autograd's gradient of an embedding lookup is a dense vocab x d tensor (zeroed, then
filled, then added to the tied head's gradient), a share of a segment's work on CPU. Given the
embedding module, the lookup's output is made a leaf, and its gradient is added to the weight's rows
(index_add): the same gradient, sparse. Only for a plain torch.nn.Embedding whose weight is adapted.

Cost (SPEC 5): `grad` and `step` add their flops to a ledger when given one. The backward is counted
by FlopCounterMode (via tta_bench.protocol.flops.dispatch_flops) once per `key` the caller names (the input
shape) and reused; the update is elementwise work, which FlopCounterMode does not see, so it is
counted analytically per parameter element: one flop per multiply-add and per other arithmetic op.

rms statistics (`rms_statistics`): sqrt(ms) over the first segments of the prepare split, kept in the
harness's cache of prepared state, so `tta-bench prepare` computes them once.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from tta_bench.api.errors import TTABenchError
from tta_bench.protocol.flops import dispatch_flops

VARIANTS = ("sgd", "rms")
# Default step sizes, per variant: rms divides each gradient by its rms over the prepare split, so its
# step is per unit of normalised gradient and must be far smaller (1e-3 diverges on smollm2-135m).
DEFAULT_LR = {"sgd": 1e-3, "rms": 3e-5}


def update_rule_problems(lr: float, decay: float, eps: float, n_stat_segments: int, prefix: str = "") -> list[str]:
    """Config problems of the update rule's settings, named as the method calls them (`prefix`)."""
    out = []
    if not lr > 0:
        out.append(f"{prefix}lr must be > 0, got {lr}")
    if not 0 <= decay < 1:
        out.append(f"{prefix}decay must be in [0, 1), got {decay}")
    if not eps > 0:
        out.append(f"{prefix}eps must be > 0, got {eps}")
    if n_stat_segments < 1:
        out.append(f"n_stat_segments must be >= 1, got {n_stat_segments}")
    return out


class DynamicEvaluation:
    """In-place dynamic-evaluation updates of a fixed list of parameters (see the module docstring)."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        variant: str = "sgd",
        lr: float = 1e-3,
        decay: float = 0.0,
        eps: float = 1e-5,
        embedding: torch.nn.Module | None = None,
        originals: Sequence[torch.Tensor] | None = None,
    ):
        """`originals`: the values a reset restores and decay pulls toward, never written (default: a
        copy of the parameters now)."""
        if variant not in VARIANTS:
            raise TTABenchError(f"dynamic evaluation variant '{variant}' is unknown; use one of {', '.join(VARIANTS)}")
        self.params = list(params)
        if not self.params:
            raise TTABenchError("dynamic evaluation needs at least one parameter to adapt")
        self.variant, self.lr, self.decay, self.eps = variant, float(lr), float(decay), float(eps)
        # bfloat16 / float16 weights: the rule runs on float32 copies, cast into the weights after each
        # step (a step below a weight's rounding step would otherwise be lost, and they add up)
        low = any(p.dtype in (torch.bfloat16, torch.float16) for p in self.params)
        self.master = [p.detach().float() for p in self.params] if low else None
        self.set_originals(self.params if originals is None else originals, copy=originals is None)
        self._requires_grad = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(True)
        self.denom: list[torch.Tensor] | None = None  # rms: sqrt(ms) + eps
        self.rms: list[torch.Tensor] | None = None  # rms with decay: sqrt(ms)
        self.numel = sum(p.numel() for p in self.params)
        self._backward_flops: dict = {}
        self._lookups: list = []  # (ids, leaf) of the watched embedding's forwards since the last grad()
        self._emb_index, self._hook = None, None
        if (
            type(embedding) is torch.nn.Embedding
            and not embedding.sparse
            and embedding.max_norm is None
            and not embedding.scale_grad_by_freq
        ):
            self._emb_index = next((i for i, p in enumerate(self.params) if p is embedding.weight), None)
            if self._emb_index is not None:
                self._padding_idx = embedding.padding_idx
                self._embedding = embedding
                self._hook = embedding.register_forward_hook(self._watch)

    @property
    def working(self) -> list[torch.Tensor]:
        """The tensors the rule updates: the float32 copies of low-precision weights, else the weights."""
        return self.params if self.master is None else self.master

    def set_originals(self, tensors: Sequence[torch.Tensor], copy: bool = True) -> None:
        """The values a reset restores and decay pulls toward (never written), in the rule's precision;
        `copy` False: kept as given where the precision is already the rule's (tensors nobody writes)."""
        self.originals = [t.detach().to(w.dtype, copy=copy) for t, w in zip(tensors, self.working)]

    def _watch(self, module, args, out):
        """Forward hook: the lookup's output as a leaf, its graph to the weight cut (see grad)."""
        if not torch.is_grad_enabled() or not out.requires_grad:
            return None
        leaf = out.detach().requires_grad_()
        self._lookups.append((args[0], leaf))
        return leaf

    # -- gradient statistics (rms) ------------------------------------------------------------
    @staticmethod
    def mean_square_root(grads_iter: Iterable[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """sqrt(ms), ms = mean over the iterable of g^2 (one gradient list per prepare segment)."""
        sums, n = None, 0
        for grads in grads_iter:
            sums = sums or [torch.zeros_like(g) for g in grads]
            torch._foreach_addcmul_(sums, list(grads), list(grads))
            n += 1
        if n == 0:
            raise TTABenchError(
                "no segments for the rms gradient statistics; give the prepare split some text or use variant sgd"
            )
        return torch._foreach_sqrt(torch._foreach_div(sums, float(n)))

    def use_stats(self, rms: Sequence[torch.Tensor]) -> None:
        """The rms rule's statistics: sqrt(ms) of every parameter, in order (from mean_square_root or a cache)."""
        if len(rms) != len(self.params) or any(r.shape != p.shape for r, p in zip(rms, self.params)):
            raise TTABenchError("rms statistics do not match the adapted parameters; delete the cached statistics")
        rms = [r.to(w.device, w.dtype) for r, w in zip(rms, self.working)]
        self.denom = torch._foreach_add(rms, self.eps)
        self.rms = rms if self.decay > 0 else None

    # -- gradient and update ------------------------------------------------------------------
    def grad(self, loss: torch.Tensor, ledger=None, key=None, params=None) -> list[torch.Tensor]:
        """Gradients of `loss` for the parameters (or for `params`, the same shapes: one lane's copy,
        lanes.py). With a ledger, adds `adapt.backward`: counted once per `key` (e.g. the input shape)
        with FlopCounterMode, then reused."""
        lookups, self._lookups = self._lookups, []
        if params is not None:
            lookups = []  # a lane's forward reads its own tensors, never the watched embedding
        params = self.params if params is None else list(params)
        wrt = params + [leaf for _, leaf in lookups]
        counting = ledger is not None and ledger.enabled
        if counting and key not in self._backward_flops:
            # counted on a backward of its own, thrown away: under the counting mode kernels may round
            # differently, and a document's gradients must not depend on what ran before it
            self._backward_flops[key] = dispatch_flops(
                lambda: torch.autograd.grad(loss, wrt, allow_unused=True, retain_graph=True)
            )
        grads = list(torch.autograd.grad(loss, wrt, allow_unused=True))
        if counting:
            ledger.add("adapt.backward", self._backward_flops[key])
        grads, leaf_grads = grads[: len(params)], grads[len(params) :]
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        for (ids, _), g in zip(lookups, leaf_grads):
            if g is None:  # a lookup this loss does not use
                continue
            ids, g = ids.reshape(-1), g.reshape(-1, g.shape[-1])
            if self._padding_idx is not None:  # the padding row gets no gradient, as in nn.Embedding
                keep = ids != self._padding_idx
                ids, g = ids[keep], g[keep]
            grads[self._emb_index].index_add_(0, ids, g.to(grads[self._emb_index].dtype))
        return grads

    def nll_grads(self, logprobs, targets, ledger=None, key=None, params=None) -> list[torch.Tensor]:
        """Gradients of the segment's mean NLL, from log-probabilities with their graph (see grad)."""
        return self.grad(F.nll_loss(logprobs, targets), ledger, key, params)

    def step_on(self, scored: "Scored", targets: torch.Tensor, ledger) -> None:
        """One update on a scored segment's mean NLL, its backward counted once per segment shape."""
        self.step(self.nll_grads(scored.logprobs, targets, ledger, key=(scored.shape, scored.n)), ledger)

    def update_flops(self) -> float:
        """Elementwise flops of one `step` (see the module docstring)."""
        if self.variant == "sgd":  # add(alpha): 1; lerp toward W0: sub + multiply-add
            per = 1 + (2 if self.decay > 0 else 0)
        else:  # addcdiv: div + multiply-add; decay: sub, then addcmul (mul + multiply-add)
            per = 2 + (3 if self.decay > 0 else 0)
        return float(per * self.numel)

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], ledger=None) -> None:
        """One update of every parameter from its gradient (the rules in the module docstring)."""
        if self.master is None:
            self.apply_rule(self.params, grads, self.originals, self.denom, self.rms)
        else:
            self.apply_rule(self.master, [g.float() for g in grads], self.originals, self.denom, self.rms)
            torch._foreach_copy_(self.params, self.master)
        if ledger is not None:
            ledger.add("adapt.update", self.update_flops())

    @torch.no_grad()
    def apply_rule(self, params, grads, originals, denom, rms) -> None:
        """The update rule on `params` in place, with these originals and rms statistics (the object's
        own in `step`; a lane's, or several lanes' stacked, in lanes.py)."""
        grads = list(grads)
        if self.variant == "sgd":
            if self.decay > 0:  # W + decay * (W0 - W), from the pre-step W
                torch._foreach_lerp_(params, originals, self.decay)
            torch._foreach_add_(params, grads, alpha=-self.lr)
        else:
            if denom is None:
                raise TTABenchError(
                    "rms dynamic evaluation needs gradient statistics first: call gradient_stats() in prepare"
                )
            if self.decay > 0:  # W - decay * sqrt(ms) * (W - W0), from the pre-step W
                diff = torch._foreach_sub(originals, params)
                torch._foreach_addcmul_(params, rms, diff, value=self.decay)
            torch._foreach_addcdiv_(params, grads, denom, value=-self.lr)

    @contextmanager
    def dense_embedding_grad(self):
        """Inside, the embedding's lookups are left to autograd (its gradient dense): under vmap a
        lookup's output is a batched tensor that cannot be made a leaf of its own."""
        hook, self._hook = self._hook, None
        if hook is not None:
            hook.remove()
        try:
            yield
        finally:
            if hook is not None:
                self._hook = self._embedding.register_forward_hook(self._watch)

    # -- state ----------------------------------------------------------------------------------
    @torch.no_grad()
    def reset(self) -> None:
        """Weights back to their original values."""
        torch._foreach_copy_(self.params, self.originals)
        if self.master is not None:
            torch._foreach_copy_(self.master, self.originals)
        self._lookups = []

    def close(self) -> None:
        """Reset, and give the parameters back their requires_grad flags: the model is as it was found."""
        self.reset()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for p, flag in zip(self.params, self._requires_grad):
            p.requires_grad_(flag)


@dataclass(frozen=True)
class Scored:
    """A scored segment's log-probabilities with their graph attached, kept from score() for adapt()."""

    shape: tuple  # the segment's input shape
    n: int  # its number of targets
    logprobs: torch.Tensor  # (n, V)


def score_with_graph(logprobs_of: Callable, seg) -> tuple[Scored, torch.Tensor]:
    """(what adapt() steps on, the scores): `logprobs_of(seg)` with autograd on, so that the update
    differentiates these very log-probabilities (the same context and state the scoring used)."""
    with torch.enable_grad():
        logprobs = logprobs_of(seg)
    return Scored(tuple(seg.ids.shape), seg.n, logprobs), logprobs.detach()


def take_scored(scored: Scored | None, seg, method: str) -> Scored:
    """The kept scoring of `seg`; refuses an adapt() that no score() of the same segment preceded."""
    if scored is None or scored.shape != tuple(seg.ids.shape):
        raise TTABenchError(f"{method}: adapt() without a matching score() of the same segment; call score first")
    return scored


def rms_statistics(data, protocol, n_segments: int, key: dict, segment_grads) -> list[torch.Tensor]:
    """sqrt(ms) of every adapted parameter (the rms rule's statistics) over the first `n_segments`
    segments of the prepare split (under `protocol`, None: the default), `segment_grads(seg)` giving
    one segment's gradients; from the harness's cache of prepared state (keyed by `key`, the protocol
    and the count), else computed and cached."""
    from safetensors.torch import load_file, save_file

    from tta_bench.protocol.evaluate import Protocol

    protocol = protocol or Protocol()
    # Every segment has at most segment_len targets, so this many tokens give at least n segments.
    stream = data.load(limit_tokens=n_segments * protocol.segment_len)

    def build(folder):
        segs = itertools.islice(data.segments(stream, protocol), n_segments)
        rms = DynamicEvaluation.mean_square_root(segment_grads(seg) for seg in segs)
        save_file({f"p{i}": r.detach().cpu().contiguous() for i, r in enumerate(rms)}, str(folder / "rms.safetensors"))
        return {"parameters": len(rms)}

    key = {
        "format": 1,
        **key,
        "n_stat_segments": n_segments,
        "protocol": [protocol.segment_len, protocol.context_len, protocol.reset],
    }
    folder = data.cached("rms-statistics", stream, key, build)
    tensors = load_file(str(folder / "rms.safetensors"))
    return [tensors[f"p{i}"] for i in range(len(tensors))]
