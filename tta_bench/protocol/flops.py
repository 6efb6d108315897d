"""FLOP accounting per SPEC section 5: one multiply-add counts as one flop (fvcore's convention).

Forward passes are counted by fvcore's `FlopCountAnalysis` (with a handle for
`aten::scaled_dot_product_attention`, which fvcore lacks); backward and update work, which tracing a
forward cannot see, by `torch.utils.flop_counter.FlopCounterMode`, halved to the same convention;
search costs analytically. A `Ledger` collects, per cell, how often each forward shape ran and the
extra flops a method reports, each under its own key.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from math import prod
from typing import Any, Callable

# The padding of lanes of unequal inputs (lm.hidden_lanes): its own key, left out of flops per token.
PADDING = "forward.padding."

# fvcore counts per (model fingerprint, component, shape): tracing is slow, shapes repeat across cells.
_MEMO: dict[tuple, tuple[float, dict]] = {}


def _shape(v) -> list[int]:
    return v.type().sizes()


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """Q K^T plus attention-weights V, full matrices (the causal mask does not remove the work)."""
    q, k, v = (_shape(inputs[i]) for i in range(3))
    batch, lq, d = prod(q[:-2]), q[-2], q[-1]
    lk, dv = k[-2], v[-1]
    return batch * lq * lk * (d + dv)


def fvcore_count(module, inputs: tuple) -> tuple[float, dict[str, int]]:
    """Forward flops of module(*inputs) and the ops fvcore could not count."""
    import torch
    from fvcore.nn import FlopCountAnalysis

    with torch.no_grad():
        analysis = FlopCountAnalysis(module, inputs)
        analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        total = float(analysis.total())
        unsupported = dict(analysis.unsupported_ops())
    return total, unsupported


def dispatch_flops(fn: Callable[[], Any]) -> float:
    """Flops of everything fn runs (backward and optimiser steps included), in fvcore's convention:
    FlopCounterMode's formulas (two flops per multiply-add, so the count is halved), applied by a
    plain dispatch mode, because FlopCounterMode's module tracker refuses `torch.autograd.grad` on
    leaves (prepare code calls it: gradient statistics)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry, shape_wrapper

    registry = {**flop_registry, **{k: shape_wrapper(v) for k, v in _cpu_sdpa_formulas().items()}}

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = registry.get(func._overloadpacket)
            if formula is not None:
                Count.total += formula(*args, **kwargs, out_val=out)
            return out

    with Count():
        fn()
    return Count.total / 2


def _cpu_sdpa_formulas() -> dict:
    """FlopCounterMode lacks the CPU flash-attention kernels: count them as it counts the CUDA ones
    (two flops per multiply-add; backward twice the forward), by query heads so grouped KV works."""
    import torch

    aten = torch.ops.aten

    def forward(q, k, v, *args, **kwargs):
        return 2 * prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])

    def backward(grad_out, q, k, v, *args, **kwargs):
        return 2 * forward(q, k, v)

    return {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }


class Ledger:
    """What one cell computed: forward calls by component and shape, plus method-reported flops."""

    def __init__(self, fingerprint: str = "", enabled: bool = True):
        self.fingerprint = fingerprint
        self.calls: Counter = Counter()
        self.counters: dict[tuple, Callable[[], tuple[float, dict]]] = {}
        self.extra: Counter = Counter()
        self.enabled = enabled

    @contextmanager
    def paused(self):
        """Nothing computed inside is charged (prepare, the checks' own passes, a method's bookkeeping);
        the ledger is as it was afterwards, also after an error."""
        was, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = was

    def record_forward(self, component: str, shape: tuple, counter: Callable[[], tuple[float, dict]]) -> None:
        """One forward of `component` on inputs of `shape` ran; `counter()` gives its fvcore count."""
        if not self.enabled:
            return
        key = (component, tuple(shape))
        self.calls[key] += 1
        if key not in self.counters:
            self.counters[key] = counter

    def absorb(self, other: "Ledger") -> None:
        """Charge what `other` recorded as if it had been recorded here (a lane's step charges what one
        lane's step on its own charges: methods measure that once per shape on a scratch ledger)."""
        if not self.enabled:
            return
        for key, n in other.calls.items():
            self.calls[key] += n
            self.counters.setdefault(key, other.counters[key])
        self.extra.update(other.extra)

    def add(self, key: str, flops: float) -> None:
        """Flops that tracing a forward cannot see: `adapt.backward`, `adapt.update`, `search.<what>`..."""
        if self.enabled:
            self.extra[key] += float(flops)

    def resolve(self) -> dict:
        """Totals per key (`forward.<component>` and the method's keys) and fvcore's unsupported ops."""
        totals: Counter = Counter()
        unsupported: Counter = Counter()
        for key, n in sorted(self.calls.items()):
            memo_key = (self.fingerprint, key)
            if memo_key not in _MEMO:
                _MEMO[memo_key] = self.counters[key]()
            flops, unsup = _MEMO[memo_key]
            totals[f"forward.{key[0]}"] += n * flops
            for op in unsup:
                unsupported[op] += n * unsup[op]
        totals.update(self.extra)
        return {"flops": dict(totals), "unsupported_ops": dict(sorted(unsupported.items()))}


class Resolved:
    """A ledger already resolved (per-rank ledgers summed under torchrun): what a record reads."""

    def __init__(self, resolved: dict):
        self.resolved = resolved

    def resolve(self) -> dict:
        return self.resolved


@contextmanager
def charging(lm, ledger):
    """`lm` charges `ledger` inside, and its own ledger again afterwards."""
    own, lm.ledger = lm.ledger, ledger
    try:
        yield ledger
    finally:
        lm.ledger = own
