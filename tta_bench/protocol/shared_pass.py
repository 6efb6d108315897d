"""One base-model pass over an input, shared by every cell of a run that reads the frozen base model.

`none`, the cache, kNN-LM and FWL's block all start from the same forward of the unchanged base model
over the same windows. Computing it once per input and handing the result to each cell that asks
saves a full pass per such cell. What a cell is charged does not change (SPEC 5): the FLOPs of the
forward go into its ledger as if it had run it, and the seconds the pass took when it was computed
are added to the segment's time (`LM.take_charged_seconds`).

A pass is reused only while it would come out the same: the same input ids, the model unchanged (the
in-place version counter of every parameter, which an optimizer step or a reset's copy moves), no
forward hook on any module (an adapter attached by hooks), no gradient wanted through it, the same
autocast. Anything else computes afresh. The results live on the
CPU (the device's peak memory stays the cell's own), at most `max_bytes` of them, oldest out first.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class Pass:
    hidden: torch.Tensor  # (B, L, d) final hidden states, on the CPU
    ffn_input: torch.Tensor | None  # (B, L, d) the last feed-forward's input, when it was asked for
    seconds: float  # what computing it took


class SharedPasses:
    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes, self.used = max_bytes, 0
        self.entries: OrderedDict[tuple, Pass] = OrderedDict()
        self.hits = self.misses = 0

    def key(self, model: torch.nn.Module, ids: torch.Tensor) -> tuple | None:
        """The identity of a pass over `ids` by `model` as it is now; None when it must not be shared."""
        params = list(model.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None  # a method wants gradients through the base: its own forward
        if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
            return None  # a hook (an adapter, a probe) may change what the forward computes
        versions = hashlib.blake2b(repr([p._version for p in params]).encode(), digest_size=16).hexdigest()
        content = hashlib.blake2b(ids.detach().cpu().numpy().tobytes(), digest_size=16).hexdigest()
        autocast = torch.is_autocast_enabled() and torch.get_autocast_dtype(ids.device.type)
        return (id(model), versions, tuple(ids.shape), content, str(autocast))

    def get(self, key: tuple | None, need_ffn: bool) -> Pass | None:
        found = self.entries.get(key) if key is not None else None
        if found is None or (need_ffn and found.ffn_input is None):
            self.misses += key is not None
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return found

    def put(self, key: tuple, hidden: torch.Tensor, ffn_input: torch.Tensor | None, seconds: float) -> None:
        item = Pass(hidden.detach().cpu(), None if ffn_input is None else ffn_input.detach().cpu(), seconds)
        size = _size(item)
        if size > self.max_bytes:
            return
        old = self.entries.pop(key, None)
        self.used += size - (_size(old) if old else 0)
        self.entries[key] = item
        while self.used > self.max_bytes:
            self.used -= _size(self.entries.popitem(last=False)[1])


def _size(p: Pass) -> int:
    return sum(t.numel() * t.element_size() for t in (p.hidden, p.ffn_input) if t is not None)


class Stopwatch:
    """Seconds of a pass, synchronised on CUDA so they are the pass's own."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
