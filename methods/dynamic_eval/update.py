"""The dynamic-evaluation update rule (Krause et al. 2018, 2019; SPEC section 3), reusable by any method.

    from tta_bench_methods.dynamic_eval.update import DynamicEvaluation, select_parameters

    named = select_parameters(model, "last 2")         # "all" | "last N" (blocks) | a name regex
    dyn = DynamicEvaluation([p for _, p in named], variant="rms", lr=1e-4, decay=0.0, eps=1e-5,
                            embedding=model.get_input_embeddings())  # optional: a cheaper exact gradient
    dyn.use_stats(dyn.mean_square_root(grads for each prepare segment))  # rms only: sqrt(ms), ms = mean of g^2
    ...
    grads = dyn.grad(loss)                             # d loss / d params (autograd.grad, no .grad kept)
    dyn.step(grads)                                    # the update below, in place
    dyn.reset()                                        # weights back to the originals
    dyn.close()                                        # reset, and give requires_grad back

Update rules, W0 the values when the object was made (the one copy kept, of these parameters only):
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
by FlopCounterMode (via tta_bench.flops.dispatch_flops) once per `key` the caller names (the input
shape) and reused; the update is elementwise work, which FlopCounterMode does not see, so it is
counted analytically per parameter element: one flop per multiply-add and per other arithmetic op.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch

from tta_bench.errors import TTABenchError
from tta_bench.flops import dispatch_flops

VARIANTS = ("sgd", "rms")
# Default step sizes, per variant: rms divides each gradient by its rms over the prepare split, so its
# step is per unit of normalised gradient and must be far smaller (1e-3 diverges on smollm2-135m).
DEFAULT_LR = {"sgd": 1e-3, "rms": 3e-5}
_LAST = re.compile(r"^last[\s_:-]*(\d+)(\s*blocks?)?$", re.IGNORECASE)


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


def parse_selection(spec: str) -> tuple[str, object]:
    """("all", None) | ("last", N) | ("pattern", compiled regex); raises on a bad spec."""
    spec = spec.strip()
    if spec.lower() == "all":
        return "all", None
    m = _LAST.match(spec)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise TTABenchError(f"params '{spec}': the number of blocks must be at least 1")
        return "last", n
    try:
        return "pattern", re.compile(spec)
    except re.error as e:
        raise TTABenchError(f"params '{spec}' is neither all, 'last N' nor a valid regular expression ({e}); fix it") from None


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The transformer's stack of blocks: the ModuleList holding the most parameters
    (model.layers in Llama, transformer.h in GPT-2, gpt_neox.layers ...)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if n > 0 and (best is None or n > best[2]):
                best = (name, mod, n)
    if best is None:
        raise TTABenchError(f"{type(model).__name__} has no list of blocks; select parameters with 'all' or a name pattern")
    return best[0], best[1]


def select_parameters(model: torch.nn.Module, spec: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters chosen by `spec`:
    - "all": every parameter (shared ones, e.g. tied embeddings, once);
    - "last N" (also "last:N", "last N blocks"): the parameters of the last N transformer blocks only
      (not the final norm or the head; add them with a pattern if wanted);
    - anything else: a regular expression searched in each parameter name (e.g. "mlp", r"layers\\.2[89]\\.").
    Raises if nothing is selected."""
    kind, arg = parse_selection(spec)
    named = list(model.named_parameters(remove_duplicate=True))
    if kind == "all":
        chosen = named
    elif kind == "last":
        prefix, blocks = find_blocks(model)
        if arg > len(blocks):
            raise TTABenchError(f"params '{spec}': the model has only {len(blocks)} blocks; choose N <= {len(blocks)}")
        keep = {f"{prefix}.{i}." if prefix else f"{i}." for i in range(len(blocks) - arg, len(blocks))}
        chosen = [(n, p) for n, p in named if any(n.startswith(k) for k in keep)]
    else:
        chosen = [(n, p) for n, p in named if arg.search(n)]
    if not chosen:
        example = ", ".join(n for n, _ in named[:3])
        raise TTABenchError(f"params '{spec}' selects no parameter of {type(model).__name__} (names look like {example}); fix the pattern")
    return chosen


class DynamicEvaluation:
    """In-place dynamic-evaluation updates of a fixed list of parameters (see the module docstring)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], variant: str = "sgd", lr: float = 1e-3,
                 decay: float = 0.0, eps: float = 1e-5, embedding: torch.nn.Module | None = None):
        if variant not in VARIANTS:
            raise TTABenchError(f"dynamic evaluation variant '{variant}' is unknown; use one of {', '.join(VARIANTS)}")
        self.params = list(params)
        if not self.params:
            raise TTABenchError("dynamic evaluation needs at least one parameter to adapt")
        self.variant, self.lr, self.decay, self.eps = variant, float(lr), float(decay), float(eps)
        self.originals = [p.detach().clone() for p in self.params]
        self._requires_grad = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(True)
        self.denom: list[torch.Tensor] | None = None  # rms: sqrt(ms) + eps
        self.rms: list[torch.Tensor] | None = None  # rms with decay: sqrt(ms)
        self.numel = sum(p.numel() for p in self.params)
        self._backward_flops: dict = {}
        self._lookups: list = []  # (ids, leaf) of the watched embedding's forwards since the last grad()
        self._emb_index, self._hook = None, None
        if (type(embedding) is torch.nn.Embedding and not embedding.sparse and embedding.max_norm is None
                and not embedding.scale_grad_by_freq):
            self._emb_index = next((i for i, p in enumerate(self.params) if p is embedding.weight), None)
            if self._emb_index is not None:
                self._padding_idx = embedding.padding_idx
                self._hook = embedding.register_forward_hook(self._watch)

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
            raise TTABenchError("no segments for the rms gradient statistics; give the prepare split some text or use variant sgd")
        return torch._foreach_sqrt(torch._foreach_div(sums, float(n)))

    def use_stats(self, rms: Sequence[torch.Tensor]) -> None:
        """The rms rule's statistics: sqrt(ms) of every parameter, in order (from mean_square_root or a cache)."""
        if len(rms) != len(self.params) or any(r.shape != p.shape for r, p in zip(rms, self.params)):
            raise TTABenchError("rms statistics do not match the adapted parameters; delete the cached statistics")
        rms = [r.to(p.device, p.dtype) for r, p in zip(rms, self.params)]
        self.denom = torch._foreach_add(rms, self.eps)
        self.rms = rms if self.decay > 0 else None

    # -- gradient and update ------------------------------------------------------------------
    def grad(self, loss: torch.Tensor, ledger=None, key=None) -> list[torch.Tensor]:
        """Gradients of `loss` for the parameters. With a ledger, adds `adapt.backward`: counted once per
        `key` (e.g. the input shape) with FlopCounterMode, then reused."""
        lookups, self._lookups = self._lookups, []
        wrt = self.params + [leaf for _, leaf in lookups]
        counting = ledger is not None and ledger.enabled
        if counting and key not in self._backward_flops:
            # counted on a backward of its own, thrown away: under the counting mode kernels may round
            # differently, and a document's gradients must not depend on what ran before it
            self._backward_flops[key] = dispatch_flops(lambda: torch.autograd.grad(loss, wrt, allow_unused=True, retain_graph=True))
        grads = list(torch.autograd.grad(loss, wrt, allow_unused=True))
        if counting:
            ledger.add("adapt.backward", self._backward_flops[key])
        grads, leaf_grads = grads[:len(self.params)], grads[len(self.params):]
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        for (ids, _), g in zip(lookups, leaf_grads):
            if g is None:  # a lookup this loss does not use
                continue
            ids, g = ids.reshape(-1), g.reshape(-1, g.shape[-1])
            if self._padding_idx is not None:  # the padding row gets no gradient, as in nn.Embedding
                keep = ids != self._padding_idx
                ids, g = ids[keep], g[keep]
            grads[self._emb_index].index_add_(0, ids, g.to(grads[self._emb_index].dtype))
        return grads

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
        grads = list(grads)
        if self.variant == "sgd":
            if self.decay > 0:  # W + decay * (W0 - W), from the pre-step W
                torch._foreach_lerp_(self.params, self.originals, self.decay)
            torch._foreach_add_(self.params, grads, alpha=-self.lr)
        else:
            if self.denom is None:
                raise TTABenchError("rms dynamic evaluation needs gradient statistics first: call gradient_stats() in prepare")
            if self.decay > 0:  # W - decay * sqrt(ms) * (W - W0), from the pre-step W
                diff = torch._foreach_sub(self.originals, self.params)
                torch._foreach_addcmul_(self.params, self.rms, diff, value=self.decay)
            torch._foreach_addcdiv_(self.params, grads, self.denom, value=-self.lr)
        if ledger is not None:
            ledger.add("adapt.update", self.update_flops())

    # -- state ----------------------------------------------------------------------------------
    @torch.no_grad()
    def reset(self) -> None:
        """Weights back to their original values."""
        torch._foreach_copy_(self.params, self.originals)
        self._lookups = []

    def close(self) -> None:
        """Reset, and give the parameters back their requires_grad flags: the model is as it was found."""
        self.reset()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for p, flag in zip(self.params, self._requires_grad):
            p.requires_grad_(flag)
