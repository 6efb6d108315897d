"""Per-token logs (`log_tokens: true`, `run --log-tokens`): for every scored token of a cell, its
target id and log-probability (float32), and the target's frequency rank in the prepare split, kept
in `cells/<cell id>.tokens.npz` beside the cell's JSON (written atomically, its sha256 in the record).
`tta-bench report` reads them (report.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from tta_bench.results.files import atomic_write
from tta_bench.results.records import CellRecord

SUFFIX = ".tokens.npz"


class TokenLog:
    """An evaluation observer: keeps each segment's target log-probabilities (on the device until the
    end, so that logging adds no synchronisation to the timed loop)."""

    def __init__(self, then=None):
        self.parts: list = []
        self.then = then  # another observer to call

    def __call__(self, seg, logprobs, targets):
        self.parts.append((seg.doc, seg.start, logprobs.gather(1, targets[:, None])[:, 0], targets))
        if self.then is not None:
            self.then(seg, logprobs, targets)

    def arrays(self, doc_tokens: list[int], ranks: np.ndarray) -> dict:
        """targets (int32), logprob (float32), prep_rank (int32: 0 the prepare split's most frequent
        token, -1 unseen there) of every token in stream order; doc_offsets (int64) cut it into documents."""
        offsets = np.concatenate([[0], np.cumsum(doc_tokens)]).astype(np.int64)
        logprob = np.full(offsets[-1], np.nan, np.float32)
        targets = np.full(offsets[-1], -1, np.int32)
        for doc, start, lp, tg in self.parts:
            at = offsets[doc] + start
            logprob[at : at + len(lp)] = lp.float().cpu().numpy()
            targets[at : at + len(tg)] = tg.cpu().numpy()
        return {"targets": targets, "logprob": logprob, "prep_rank": ranks[targets], "doc_offsets": offsets}


def frequency_ranks(ids: list[list[int]], vocab: int) -> np.ndarray:
    """Per token id, its rank by frequency in these documents (0: the most frequent; ties by id), -1 where unseen."""
    counts = np.bincount(
        np.concatenate([np.asarray(d, np.int64) for d in ids] or [np.zeros(0, np.int64)]), minlength=vocab
    )
    order = np.lexsort((np.arange(len(counts)), -counts))
    ranks = np.empty(len(counts), np.int32)
    ranks[order] = np.arange(len(counts), dtype=np.int32)
    ranks[counts == 0] = -1
    return ranks


def write(path: Path, arrays: dict) -> str:
    """Write the log atomically; returns its sha256."""
    atomic_write(path, write=lambda tmp: np.savez_compressed(open(tmp, "wb"), **arrays))
    return file_hash(path)


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read(run_dir: Path, record: CellRecord) -> dict:
    """The arrays of a cell record's per-token log."""
    with np.load(Path(run_dir) / "cells" / record.token_log["file"]) as f:
        return {k: f[k] for k in f.files}


def problem(run_dir: Path, record: CellRecord) -> str | None:
    """Why a finished cell record's token log cannot be used (None: it can)."""
    info = record.token_log
    if not info:
        return "it has no per-token log (log_tokens is on)"
    path = Path(run_dir) / "cells" / info["file"]
    if not path.is_file():
        return f"its per-token log {path.name} is missing"
    if file_hash(path) != info["sha256"]:
        return f"its per-token log {path.name} does not match the hash in its record"
    return None
