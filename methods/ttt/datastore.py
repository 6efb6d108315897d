"""The datastore of test-time training on nearest neighbours (Hardt & Sun 2024; SPEC 3): fixed-length
chunks of the prepare split, each keyed by the base model's mean final hidden state over its
positions, searched exactly with faiss.

- `chunk_pieces`: every document cut into consecutive, non-overlapping chunks of `chunk_len` tokens
  (a document's last chunk may be shorter); a chunk is trained on as (inputs, targets): its tokens
  behind the token before it (the start token at a document's start), like finetune's pieces.
- `ChunkStore.build`: the keys from the harness's shared pass over the prepare split
  (`PrepareData.features`: row p is the position that predicts token p, read with the cell's
  protocol), so building it costs no forward of its own; a chunk's key is the mean of its rows, and a
  query is the same mean over the rows of a scored segment.
- `ChunkStore.nearest`: the k nearest chunks by squared L2, nearest first, and the search's flops
  (exact search: one multiply-add per key element, as kNN-LM counts it).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from tta_bench.api.errors import TTABenchError


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise TTABenchError("ttt-nn needs faiss: pip install faiss-cpu (or tta-bench[knn])") from None
    return faiss


@contextmanager
def one_faiss_thread():
    """One query against a small index: faiss's OpenMP barriers cost more than the search on a busy
    machine; faiss and torch share the OpenMP runtime, so torch's thread count is put back after."""
    faiss = faiss_module()
    before = torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield faiss
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Chunk:
    inputs: torch.Tensor  # (L,) the token before the chunk, then its tokens but the last
    targets: torch.Tensor  # (L,) the chunk's tokens
    doc: int  # document of the prepare stream
    start: int  # position of its first token in the document


def chunk_pieces(stream, start_id: int, chunk_len: int) -> list[Chunk]:
    """Every document of `stream` in consecutive chunks of `chunk_len` tokens, in stream order."""
    out = []
    for d, doc in enumerate(stream.docs):
        ids = torch.tensor(doc.ids, dtype=torch.long)
        inputs = torch.cat([torch.tensor([start_id]), ids[:-1]])
        out += [Chunk(inputs[s : s + chunk_len], ids[s : s + chunk_len], d, s) for s in range(0, len(ids), chunk_len)]
    return out


class ChunkStore:
    """The chunks, their keys (N, d) float32, and an exact faiss index over the keys."""

    def __init__(self, chunks: list[Chunk], keys: np.ndarray):
        if not chunks:
            raise TTABenchError(
                "the prepare split has no tokens for the ttt-nn datastore; give the task a prepare split"
            )
        self.chunks = chunks
        self.keys = np.ascontiguousarray(keys, dtype=np.float32)
        self.n, self.d = self.keys.shape
        with one_faiss_thread() as faiss:
            self.index = faiss.IndexFlatL2(self.d)
            self.index.add(self.keys)

    @classmethod
    def build(cls, data, stream, protocol, chunk_len: int) -> "ChunkStore":
        """Chunks of the prepare stream keyed by the shared pass's final hidden states (mean over each chunk)."""
        if stream.n_tokens == 0:
            raise TTABenchError(
                f"the datastore split '{stream.split}' has no tokens; give the task a prepare split with text"
            )
        chunks = chunk_pieces(stream, data.lm.start_id, chunk_len)
        feats = data.features(stream, protocol)
        keys = np.stack([feats[c.doc]["hidden"][c.start : c.start + len(c.targets)].mean(0).numpy() for c in chunks])
        return cls(chunks, keys)

    def nearest(self, query: torch.Tensor, k: int) -> tuple[list[int], float]:
        """(ids of the k nearest chunks, nearest first; the search's flops) for one query (d,)."""
        q = np.ascontiguousarray(query.detach().float().cpu().numpy()[None], dtype=np.float32)
        with one_faiss_thread():
            _, ids = self.index.search(q, min(k, self.n))
        return [int(i) for i in ids[0] if i >= 0], float(self.n * self.d)

    def drawn(self, k: int, seed: int) -> list[int]:
        """k distinct chunk ids drawn uniformly at random (seeded): the control's choice."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randperm(self.n, generator=gen)[: min(k, self.n)].tolist()
