"""kNN-LM's datastore and search (Khandelwal et al. 2020; SPEC 3).

- `KeyReader`: at scoring time, one forward of the body gives the final hidden states and the key: the
  input of the last block's feed-forward layer (the paper's key), or the final hidden state.
- The datastore: keys and next-token values over the prepare split. The keys are the base model's
  features from the harness's shared pass over that split (`PrepareData.features`), so building it
  costs no forward of its own when another method (FWL) already read the split the same way.
- `KnnIndex`: faiss exact (IndexFlatL2) or IVF-PQ (optionally re-ranked with exact distances); a
  trained IVF-PQ index is kept in the harness's cache of prepared state.
- `KnnStore`: the datastore's index plus an online part (test tokens added after scoring).
"""

from __future__ import annotations

import copy

from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tta_bench.api.errors import TTABenchError

from .mix import masked_softmax, mix

# Below this many keys `index: auto` searches exactly; above, IVF-PQ.
AUTO_EXACT_MAX_KEYS = 100_000
FFN_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise TTABenchError("kNN-LM needs faiss: pip install faiss-cpu (or tta-bench[knn])") from None
    return faiss


@contextmanager
def faiss_threads(work: float):
    """faiss with one OpenMP thread for small jobs: on a busy machine its thread barriers cost far
    more than small searches themselves. faiss and torch share one OpenMP runtime, so torch's
    thread count is put back afterwards."""
    faiss = faiss_module()
    before = torch.get_num_threads()
    faiss.omp_set_num_threads(before if work > 3e8 else 1)
    try:
        yield faiss
    finally:
        torch.set_num_threads(before)


class KeyReader:
    """One body forward -> (final hidden states, keys) of the last n input positions.

    key 'ffn_input': the input of the last block's feed-forward layer, read by a forward hook
    (Khandelwal et al.'s choice); key 'hidden': the final hidden state (after the final norm)."""

    def __init__(self, lm, key: str):
        if key not in ("ffn_input", "hidden"):
            raise TTABenchError(f"key must be ffn_input or hidden, got {key!r}")
        self.lm, self.key = lm, key
        if key == "ffn_input":
            _ffn_or_error(lm)

    def __call__(self, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(h (n, d) in the model's dtype, keys (n, d) float32)."""
        return self.lanes([ids], [n])[0]

    def lanes(self, inputs: list[torch.Tensor], ns: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(h, keys) of each (1, L_i) input's last n_i positions, from one batched forward."""
        if self.key == "hidden":
            return [(h[-n:], h[-n:].float()) for h, n in zip(self.lm.hidden_lanes(inputs), ns)]
        return [(h[-n:], f[-n:].float()) for (h, f), n in zip(self.lm.hidden_and_ffn_input_lanes(inputs), ns)]


def _ffn_or_error(lm) -> None:
    try:
        lm.last_ffn()
    except TTABenchError as e:
        raise TTABenchError(f"{e}: set `key: hidden`") from None


def datastore(data, stream, protocol, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(keys (N, d) float32, values (N,) int64) over the stream: the key at every position and the
    token it predicts, in stream order, read with the cell's protocol."""
    if stream.n_tokens == 0:
        raise TTABenchError(
            f"the datastore split '{stream.split}' has no tokens; give the task a prepare split with text"
        )
    if key == "ffn_input":
        _ffn_or_error(data.lm)
    feats = data.features(stream, protocol)
    keys = np.concatenate([f[key].numpy() for f in feats])
    values = np.concatenate([np.asarray(d.ids, dtype=np.int64) for d in stream.docs])
    return keys, values


class KnnIndex:
    """faiss search over a datastore's keys: exact (IndexFlatL2) or IVF-PQ.

    IVF-PQ: `nlist` coarse cells, `code_size` bytes per key (8-bit sub-quantizers), `nprobe` cells
    searched; `rerank` > 0 fetches rerank*k candidates by PQ distance and returns the k nearest by
    exact distance over the full-precision keys (faiss IndexRefine). Distances are squared L2."""

    def __init__(
        self,
        keys: np.ndarray,
        kind: str = "exact",
        nlist: int = 1024,
        code_size: int = 64,
        nprobe: int = 32,
        rerank: int = 1,
        seed: int = 0,
        cached: Callable | None = None,
    ):
        """`cached(params, build)`: the folder of a trained IVF-PQ index (the harness's cache of prepared
        state), `build(folder)` writing index.faiss into a new one; None trains it here."""
        faiss = faiss_module()
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        self.n, self.d = keys.shape
        self.kind = (
            "exact" if kind == "auto" and self.n < AUTO_EXACT_MAX_KEYS else ("ivfpq" if kind == "auto" else kind)
        )
        self.nlist, self.code_size, self.nprobe, self.rerank = nlist, code_size, nprobe, rerank
        if self.kind == "ivfpq" and self.d % code_size:
            raise TTABenchError(f"code_size {code_size} must divide the key dimension {self.d}; pick a divisor")
        if self.kind == "ivfpq" and self.n < max(nlist, 256):
            raise TTABenchError(
                f"IVF-PQ needs at least max(nlist, 256) keys, the datastore has {self.n};"
                " lower nlist or use index: exact"
            )
        flat = None
        if self.kind == "exact" or rerank > 0:
            flat = faiss.IndexFlatL2(self.d)
            with faiss_threads(self.n * self.d):
                flat.add(keys)
        if self.kind == "exact":
            self.index, self._parts = flat, (flat,)
            return

        def build(folder: Path) -> dict:
            quantizer = faiss.IndexFlatL2(self.d)
            ivf = faiss.IndexIVFPQ(quantizer, self.d, nlist, code_size, 8)
            ivf.own_fields = True
            quantizer.this.disown()
            for cp in (ivf.cp, ivf.pq.cp):
                cp.seed = seed
                cp.min_points_per_centroid = 1  # small datastores are allowed: no warning per sub-quantizer
            with faiss_threads(self.n * self.d * (nlist + 256)):
                ivf.train(keys)
                ivf.add(keys)
            faiss.write_index(ivf, str(folder / "index.faiss"))
            return {"n_keys": self.n, "dim": self.d}

        params = {"nlist": nlist, "code_size": code_size, "seed": seed}
        if cached is None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                build(Path(tmp))
                ivf = faiss.read_index(str(Path(tmp) / "index.faiss"))
        else:
            ivf = faiss.read_index(str(cached(params, build) / "index.faiss"))
        ivf.nprobe = min(nprobe, nlist)
        if rerank > 0:
            index = faiss.IndexRefine(ivf, flat)
            index.k_factor = float(rerank)
            self.index, self._parts = index, (index, ivf, flat)  # keep the parts alive
        else:
            self.index, self._parts = ivf, (ivf,)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances, ids), each (n, k); id -1 where fewer than k were found."""
        with faiss_threads(len(q) * self.flops_per_query(k)):
            return self.index.search(np.ascontiguousarray(q, dtype=np.float32), min(k, self.n))

    def flops_per_query(self, k: int) -> float:
        """One multiply-add = one flop. Exact: n_keys * d. IVF-PQ: the coarse quantizer (nlist * d), the
        query's PQ distance tables (256 * d), nprobe lists' codes at their mean size (one add per
        code byte), and the exact distances of the re-ranked candidates (rerank * k * d)."""
        if self.kind == "exact":
            return float(self.n * self.d)
        scanned = min(self.nprobe, self.nlist) * self.n / self.nlist
        flops = self.nlist * self.d + 256 * self.d + scanned * self.code_size
        if self.rerank > 0:
            flops += min(self.rerank * k, scanned) * self.d
        return float(flops)


class KnnStore:
    """The datastore's index and values, plus an exact online part for test tokens added after scoring."""

    def __init__(self, index: KnnIndex, values: np.ndarray, k: int, temperature: float):
        self.index, self.k, self.temperature = index, k, temperature
        self.values = torch.from_numpy(np.asarray(values, dtype=np.int64))
        self.reset()

    def reset(self) -> None:
        """Forget the online part (the datastore stays)."""
        self.online_keys = torch.zeros(0, self.index.d)
        self.online_values = torch.zeros(0, dtype=torch.long)
        self._online_index = None

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        keys = keys.detach().float().cpu()
        self.online_keys = torch.cat([self.online_keys, keys])
        self.online_values = torch.cat([self.online_values, values.detach().cpu().long()])
        if self._online_index is None:
            self._online_index = faiss_module().IndexFlatL2(self.index.d)
        with faiss_threads(0):
            self._online_index.add(np.ascontiguousarray(keys.numpy()))

    def lane_copy(self) -> "KnnStore":
        """A store sharing this one's datastore, with an online part of its own (a lane's)."""
        lane = copy.copy(self)
        lane.reset()
        return lane

    def search(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared L2 distances (n, k), ids (n, k)) of the k nearest datastore keys to q (n, d)."""
        dist, ids = self.index.search(q.detach().float().cpu().numpy(), self.k)
        return torch.from_numpy(dist), torch.from_numpy(ids)

    def neighbours(self, q: torch.Tensor, searched=None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(tokens (n, k), weights (n, k), search flops) for queries q (n, d): the k nearest keys by
        squared L2 over the datastore and the online part, weights softmax(-dist / T) over them.
        `searched`: the datastore's part, `search(q)`, done already (several lanes' queries at once)."""
        qn = q.detach().float().cpu().numpy()
        dist, ids = self.search(q) if searched is None else searched
        flops = len(qn) * self.index.flops_per_query(self.k)
        tokens = self.values[ids.clamp(min=0)]
        n_on = len(self.online_values)
        if n_on:
            with faiss_threads(len(qn) * n_on * self.index.d):
                d2, i2 = self._online_index.search(qn, min(self.k, n_on))
            dist = torch.cat([dist, torch.from_numpy(d2)], 1)
            ids = torch.cat([ids, torch.from_numpy(i2)], 1)
            tokens = torch.cat([tokens, self.online_values[torch.from_numpy(i2).clamp(min=0)]], 1)
            flops += len(qn) * n_on * self.index.d
            if dist.shape[1] > self.k:
                dist, pick = torch.topk(dist, self.k, dim=1, largest=False)
                ids, tokens = ids.gather(1, pick), tokens.gather(1, pick)
        valid = ids >= 0
        weights = masked_softmax(-dist.double() / self.temperature, valid).float()
        return tokens.to(q.device), weights.to(q.device), flops


def knn_problems(p) -> list[str]:
    out = []
    if p.k < 1:
        out.append(f"k must be >= 1, got {p.k}")
    if not 0 <= p.lam < 1:
        out.append(f"lam (lambda) must be in [0, 1), got {p.lam}")
    if p.temperature <= 0:
        out.append(f"temperature must be > 0, got {p.temperature}")
    for name in ("nlist", "code_size", "nprobe"):
        if getattr(p, name) < 1:
            out.append(f"{name} must be >= 1, got {getattr(p, name)}")
    if p.rerank < 0:
        out.append(f"rerank must be >= 0 (0: PQ distances), got {p.rerank}")
    if p.datastore_tokens is not None and p.datastore_tokens < 1:
        out.append(f"datastore_tokens must be >= 1 or null, got {p.datastore_tokens}")
    return out


class KnnPart:
    """kNN-LM state of a method: the datastore's index, the online part, the mixing."""

    def __init__(self, method, p):
        self.method, self.p = method, p
        self.reader = KeyReader(method.lm, p.key)
        self.store: KnnStore | None = None
        self.info: dict = {}
        self._pending = None

    def prepare(self, data) -> None:
        from tta_bench.protocol.evaluate import Protocol

        p, protocol = self.p, self.method.protocol or Protocol()
        stream = data.load(limit_tokens=p.datastore_tokens)
        keys, values = datastore(data, stream, protocol, p.key)
        ident = {"key": p.key, "protocol": [protocol.segment_len, protocol.context_len, protocol.reset]}
        index = KnnIndex(
            keys,
            p.index,
            p.nlist,
            p.code_size,
            p.nprobe,
            p.rerank,
            seed=self.method.seed,
            cached=lambda params, build: data.cached("knn-ivfpq", stream, {**ident, **params}, build),
        )
        self.store = KnnStore(index, values, p.k, p.temperature)
        self.info = {"n_keys": len(values), "dim": index.d, "index": index.kind}
        self.open_lanes(1)

    def reset(self) -> None:
        for store in self.lane_stores:
            store.reset()

    # -- lanes: the datastore searched once for every lane's rows, an online part per lane ---------
    def open_lanes(self, n: int) -> None:
        self.lane_stores = [self.store] if n == 1 else [self.store.lane_copy() for _ in range(n)]
        self._pending: dict = {}  # lane -> the keys scored, added to its online part by adapt

    def reset_lane(self, lane: int) -> None:
        self.lane_stores[lane].reset()

    def apply(self, lps: list[torch.Tensor], keys: list[torch.Tensor], lanes: list[int]) -> list[torch.Tensor]:
        """Each lane's log-probabilities mixed with its neighbours: one datastore search for every
        lane's rows, then each lane's online part."""
        dist, ids = self.store.search(torch.cat(keys))
        ns = [len(k) for k in keys]
        out = []
        for lp, key, lane, d, i in zip(lps, keys, lanes, dist.split(ns), ids.split(ns)):
            tokens, weights, flops = self.lane_stores[lane].neighbours(key, (d, i))
            self.method.ledger.add("search.knn", flops)
            self._pending[lane] = key
            out.append(mix(lp, self.p.lam, tokens, weights))
        return out

    def adapt(self, lanes: list[int], targets: list[torch.Tensor]) -> None:
        if self.p.online:
            for lane, t in zip(lanes, targets):
                self.lane_stores[lane].add(self._pending[lane], t)
        self._pending = {}
