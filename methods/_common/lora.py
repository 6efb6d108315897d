"""Low-rank adapters (LoRA, Hu et al. 2021) on a model's linear layers, for low-rank dynamic evaluation
(SPEC 3) and test-time training:

    adapter = LoraAdapter(model, targets=r"(q|v)_proj$", rank=8, alpha=16, seed=0)
    dyn = DynamicEvaluation(adapter.params, ...)  # the update rule adapts A and B, nothing else
    adapter.count_forward(ledger, ids.shape)      # after each counted forward of the body through the model
    with adapter.disabled(): ...                  # the base model's forward (e.g. an embedding of scored text)
    adapter.remove()                              # the model as it was found

Each targeted nn.Linear computes W x + (alpha / rank) * B (A x): A (rank, in) drawn like peft's
kaiming-uniform init (U(-1/sqrt(in), 1/sqrt(in)), from `seed`), B (out, rank) zero, so an adapter
at its start changes nothing and a reset to it is exact. The adapter is a forward hook, not a module
swapped into the model: the shared model keeps its module tree, parameter names and state dict, so
its fingerprint and the FLOP counts memoised for it stay valid, and `remove()` gives it back as found.
peft's LoraLayer computes the same function (tests/test_lora_dynamic_eval.py checks it).

Cost (SPEC 5): the LM's counted forwards trace the base model only (their fvcore counts are memoised
per model and shape, and resolved after the adapter is gone), so `count_forward` records the adapter's
own forward as the ledger component `lora`: fvcore's count of A then B on every position of every
targeted layer, rank * (in + out) per position and layer. Backward and update are the ledger's as for
any dynamic evaluation (DynamicEvaluation.grad and .step).
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from tta_bench.api.errors import TTABenchError

# The linear layers of a Llama-style block (attention and feed-forward).
DEFAULT_TARGETS = r"(q|k|v|o|gate|up|down)_proj$"


def lora_problems(rank: int, alpha: float, targets: str) -> list[str]:
    """Config problems of the adapter's settings."""
    out = []
    if rank < 1:
        out.append(f"lora_rank must be >= 1, got {rank}")
    if not alpha > 0:
        out.append(f"lora_alpha must be > 0, got {alpha}")
    try:
        re.compile(targets)
    except re.error as e:
        out.append(f"lora_targets '{targets}' is not a valid regular expression ({e}); fix it")
    return out


class LoraAdapter:
    """Low-rank adapters on the linear layers of `model` whose names match `targets` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, targets: str, rank: int, alpha: float, seed: int = 0):
        pattern = re.compile(targets)
        self.modules = [
            (n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.search(n)
        ]
        if not self.modules:
            linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:3]
            raise TTABenchError(
                f"lora_targets '{targets}' matches no linear layer of {type(model).__name__}"
                f" (names look like {', '.join(linear)}); fix the pattern"
            )
        self.names = [n for n, _ in self.modules]
        self.rank, self.scale, self.enabled = rank, alpha / rank, True
        gen = torch.Generator().manual_seed(seed)
        self.A, self.B = [], []
        for _, m in self.modules:
            w = m.weight
            bound = 1 / math.sqrt(m.in_features)  # peft's kaiming_uniform_(a=sqrt(5)) on A
            a = (torch.rand(rank, m.in_features, generator=gen, dtype=torch.float64) * 2 - 1) * bound
            self.A.append(a.to(w.device, w.dtype))
            self.B.append(torch.zeros(m.out_features, rank, device=w.device, dtype=w.dtype))
        self.params = [t for pair in zip(self.A, self.B) for t in pair]  # A0, B0, A1, B1, ...
        self._handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.modules)]

    def _hook(self, i: int):
        def add_low_rank(module, args, out):
            if not self.enabled:
                return None
            return out + self.scale * F.linear(F.linear(args[0], self.A[i]), self.B[i])

        return add_low_rank

    @contextmanager
    def disabled(self):
        """The base model inside (the adapters kept, not applied)."""
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    @contextmanager
    def using(self, tensors):
        """Inside, the hooks apply these A0, B0, A1, B1, ... instead (one lane's, under vmap)."""
        saved = self.A, self.B
        self.A, self.B = list(tensors[0::2]), list(tensors[1::2])
        try:
            yield
        finally:
            self.A, self.B = saved

    def delta(self, i: int) -> torch.Tensor:
        """The full-size update of target i's weight: (alpha / rank) * B A."""
        return self.scale * self.B[i] @ self.A[i]

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.params)

    def count_forward(self, ledger, shape: tuple) -> None:
        """One forward of the body on `shape` ran with the adapters on: their forward into the ledger."""
        if not self.enabled:
            return
        dims = [(m.in_features, m.out_features) for _, m in self.modules]
        dtype, rank = self.A[0].dtype, self.rank
        # the memo key (model, component, shape) must fix the count: the rank and the layers' widths join the shape
        key = tuple(shape) + (rank, sum(i + o for i, o in dims), len(dims))
        ledger.record_forward("lora", key, lambda: _count_adapters(dims, rank, tuple(shape), dtype))

    def remove(self) -> None:
        """Take the hooks off: the model computes what it did before the adapter was made."""
        for h in self._handles:
            h.remove()
        self._handles = []


class _Adapters(torch.nn.Module):
    """A then B of each target on its own input: what the hooks add, for fvcore to trace."""

    def __init__(self, dims, rank, dtype):
        super().__init__()
        self.pairs = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.Linear(i, rank, bias=False, dtype=dtype), torch.nn.Linear(rank, o, bias=False, dtype=dtype)
            )
            for i, o in dims
        )

    def forward(self, *xs):
        return [pair(x) for pair, x in zip(self.pairs, xs)]


def _count_adapters(dims, rank, shape, dtype):
    from tta_bench.protocol.flops import fvcore_count

    xs = tuple(torch.zeros(*shape, i, dtype=dtype) for i, _ in dims)
    return fvcore_count(_Adapters(dims, rank, dtype), xs)
