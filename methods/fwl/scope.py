"""The `fast_state` option of the fwl methods: how far the fast weights' memory reaches.

- `window` (WindowScope): the state starts empty for every segment and covers its whole input window
  (context included);
- `document` (DocumentScope): the state carries from segment to segment (block.FWStream) until reset.
  A segment's new positions see every earlier position's gradient; the last one's target arrives in
  adapt(), which adds it to the state.

Each scope scores a segment's positions with the block and charges the ledger for the block's passes
(fvcore traces of them, once per shape)."""

from __future__ import annotations

import hashlib

import torch

from tta_bench.protocol.flops import fvcore_count

from .block import FWBlock, FWStream, commit_pass, score_pass


class _FastScope:
    """What both scopes share: the block, its chunk, and the ledger entries of its passes."""

    def __init__(self, block: FWBlock, chunk: int, device):
        self.block, self.chunk, self.device = block, chunk, device
        self._tag = hashlib.sha1(repr((block.cfg, chunk)).encode()).hexdigest()[:8]

    def _record(self, ledger, kind: str, shape: tuple, counter) -> None:
        ledger.record_forward(f"fwl.{kind}", (*shape, self._tag), lambda: counter(*shape))

    def _examples(self, n: int):
        """Zero inputs of n positions for the fvcore traces: hidden states, base logits, an empty state."""
        cfg = self.block.cfg
        x = torch.zeros(1, n, cfg.d_in, device=self.device)
        base = torch.zeros(1, n, cfg.vocab, device=self.device)
        return x, base, tuple(self.block.zero_state(1, x))


class WindowScope(_FastScope):
    """fast_state window: every segment's fast weights from its own input window only."""

    def reset(self):
        """Nothing is carried."""

    def new_positions(self, h: torch.Tensor, n: int) -> torch.Tensor:
        """The positions the block reads: the whole window."""
        return h

    def logits(self, h: torch.Tensor, base: torch.Tensor, ids: torch.Tensor, n: int, ledger) -> torch.Tensor:
        """(n, V) fast logits of the segment's targets; h and base over its whole window `ids`."""
        targets = torch.cat([ids[:, 1:], ids.new_full((1, 1), -1)], 1)
        self._record(ledger, "window", (ids.shape[1],), self._count_window)
        return self.block(h.float(), targets, base, None, self.chunk)[0][0, -n:]

    def commit(self, last_target: torch.Tensor, ledger) -> None:
        """Nothing is carried."""

    def _count_window(self, L):
        x, base, _ = self._examples(L)
        ids = torch.zeros(1, L, dtype=torch.long, device=x.device)
        return fvcore_count(score_pass(self.block, self.chunk, False), (x, base, ids))


class DocumentScope(_FastScope):
    """fast_state document: the state carried through the document (FWStream)."""

    def __init__(self, block: FWBlock, chunk: int, device):
        super().__init__(block, chunk, device)
        self.stream = FWStream(block, chunk)

    def reset(self):
        self.stream.reset()

    def new_positions(self, h: torch.Tensor, n: int) -> torch.Tensor:
        """The positions the block reads: only the new ones, the state holds the earlier ones."""
        return h[:, -n:]

    def logits(self, h: torch.Tensor, base: torch.Tensor, ids: torch.Tensor, n: int, ledger) -> torch.Tensor:
        """(n, V) fast logits of the segment's targets; h and base over its n new positions."""
        self._record(ledger, "score", (n,), self._count_score)
        return self.stream.segment_logits(h.float(), base, ids[:, ids.shape[1] - n + 1 :])[0]

    def commit(self, last_target: torch.Tensor, ledger) -> None:
        """The segment's last position joins the state, its target (1, 1) known now."""
        self._record(ledger, "commit", (1,), self._count_commit)
        self.stream.commit(last_target)

    def _count_score(self, n):
        x, base, state = self._examples(n)
        ids = torch.zeros(1, n - 1, dtype=torch.long, device=x.device)
        return fvcore_count(score_pass(self.block, self.chunk, True), (x, base, ids, *state))

    def _count_commit(self, n):
        x, base, state = self._examples(n)
        target = torch.zeros(1, n, dtype=torch.long, device=x.device)
        return fvcore_count(commit_pass(self.block), (x, base, target, *state))


def make_scope(params, block: FWBlock, device) -> WindowScope | DocumentScope:
    """The scope a setting names (`fast_state`, `chunk`)."""
    return (DocumentScope if params.fast_state == "document" else WindowScope)(block, params.chunk, device)
