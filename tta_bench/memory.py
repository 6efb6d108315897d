"""Shared parts of the memory-based methods (SPEC 3): kNN-LM (Khandelwal et al. 2020) and the
continuous cache (Grave et al. 2017). Neither changes a weight: both mix the model's distribution
with a distribution over tokens read from a memory,

    log p = logsumexp(log(1 - lambda) + log p_lm, log(lambda) + log p_mem),

where p_mem is exactly 0 (log -inf) for tokens the memory does not hold.

- `KeyReader`: one forward of the body gives the final hidden states and, by a forward hook, the
  input of the last block's feed-forward layer (the kNN-LM paper's key).
- `Datastore`: keys and next-token values over the prepare split, built with the base model and
  cached on disk under cache_dir()/knn/, keyed by model, stream and config.
- `KnnIndex`: faiss exact (IndexFlatL2) or IVF-PQ (optionally re-ranked with exact distances).
- `KnnMemory`: the datastore's index plus an online part (test tokens added after scoring).
- `ContinuousCache`: the last `window` (final hidden state, next token) pairs of the stream.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .errors import TTABenchError

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


def mix(lp: torch.Tensor, lam: float, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log((1 - lam) p_lm + lam p_mem) with p_mem(y) = sum of `weights` whose token is y.

    lp: (n, V) log-probabilities; tokens, weights: (n, E), each row of weights summing to 1, or to
    0 where the memory has nothing for that position (the row keeps p_lm). p_mem is 0 (log -inf)
    off the memory's tokens, so only the (row, token) cells it holds need the logsumexp; the rest
    of the row is log(1 - lam) + log p_lm."""
    n, V = lp.shape
    has = weights.sum(1) > 0
    out = lp + torch.where(has, math.log1p(-lam), 0.0).to(lp.dtype)[:, None]
    if lam == 0:
        return out
    q = torch.zeros_like(lp).scatter_add_(1, tokens, weights.to(lp.dtype))
    keep = weights > 0
    rows = torch.arange(n, device=lp.device)[:, None].expand_as(tokens)[keep]
    cols = tokens[keep]
    # a token held by several entries of a row is written several times, always with the same value
    out[rows, cols] = torch.logaddexp(out[rows, cols], math.log(lam) + torch.log(q[rows, cols]))
    return out


def masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the valid entries of each row; all-zero rows where none is valid."""
    scores = scores.masked_fill(~valid, float("-inf"))
    w = torch.softmax(scores, dim=-1)
    return torch.where(valid.any(-1, keepdim=True), w, torch.zeros_like(w))


# -- keys ---------------------------------------------------------------------------------------
def find_last_ffn(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """(name, module) of the feed-forward layer of the model's last transformer block.

    The blocks are the first ModuleList with one entry per layer (model.model.layers for Llama,
    transformer.h for GPT-2); the feed-forward is its last entry's mlp / feed_forward / ffn."""
    cfg = getattr(model, "config", None)
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers):
            last = mod[len(mod) - 1]
            for attr in FFN_NAMES:
                sub = getattr(last, attr, None)
                if isinstance(sub, torch.nn.Module):
                    return f"{name}.{len(mod) - 1}.{attr}", sub
    raise TTABenchError(
        f"cannot find the feed-forward layer of the last block of {type(model).__name__} (looked for a list of"
        f" {n_layers} blocks with one of {', '.join(FFN_NAMES)}); set `key: hidden` to use the final hidden state")


class KeyReader:
    """One body forward -> (final hidden states, keys) of the last n input positions.

    key 'ffn_input': the input of the last block's feed-forward layer, read by a forward hook
    (Khandelwal et al.'s choice); key 'hidden': the final hidden state (after the final norm)."""

    def __init__(self, lm, key: str):
        if key not in ("ffn_input", "hidden"):
            raise TTABenchError(f"key must be ffn_input or hidden, got {key!r}")
        self.lm, self.key = lm, key
        self.module_name, self.module = find_last_ffn(lm.model) if key == "ffn_input" else (None, None)

    @property
    def dim(self) -> int:
        return self.lm.hidden_size

    def __call__(self, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(h (n, d) in the model's dtype, keys (n, d) float32)."""
        if self.module is None:
            h = self.lm.hidden(ids)[0, -n:]
            return h, h.float()
        seen = []

        def hook(module, args, kwargs, output):
            seen.append(args[0] if args else next(iter(kwargs.values())))

        handle = self.module.register_forward_hook(hook, with_kwargs=True)
        try:
            h = self.lm.hidden(ids)[0, -n:]
        finally:
            handle.remove()
        if len(seen) != 1:
            raise TTABenchError(f"{self.module_name} ran {len(seen)} times in one forward, expected once; set `key: hidden`")
        return h, seen[0][0, -n:].float()


# -- datastore ----------------------------------------------------------------------------------
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class Datastore:
    """keys (N, d) float32 (memory-mapped) and values (N,) int64 over a stream, cached on disk."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.keys = np.load(folder / "keys.npy", mmap_mode="r")
        self.values = np.load(folder / "values.npy")
        self.meta = json.loads((folder / "meta.json").read_text())

    def __len__(self) -> int:
        return len(self.values)

    @classmethod
    def build_or_load(cls, reader: KeyReader, stream, protocol, progress: bool = True) -> "Datastore":
        from .models import cache_dir

        lm = reader.lm
        ident = {"model": lm.fingerprint, "dtype": str(lm.dtype), "task": stream.task, "split": stream.split,
                 "stream": stream.fingerprint, "n_tokens": stream.n_tokens, "key": reader.key,
                 "protocol": [protocol.segment_len, protocol.context_len, protocol.reset], "version": 1}
        folder = cache_dir() / "knn" / f"{lm.name.replace('/', '_')}-{stream.split}-{_digest(ident)}"
        built = not (folder / "meta.json").is_file()
        if built:
            cls._build(reader, stream, protocol, folder, ident, progress)
        store = cls(folder)
        store.built_now = built
        return store

    @staticmethod
    def _build(reader, stream, protocol, folder, ident, progress):
        from .evaluate import segments

        lm = reader.lm
        n = stream.n_tokens
        if n == 0:
            raise TTABenchError(f"the datastore split '{stream.split}' has no tokens; give the task a prepare split with text")
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        keys = np.lib.format.open_memmap(tmp / "keys.npy", mode="w+", dtype=np.float32, shape=(n, reader.dim))
        values = np.empty(n, dtype=np.int64)
        bar = None
        if progress and n > 20_000:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, unit="tok", desc=f"kNN datastore {stream.task}:{stream.split}", mininterval=2.0, leave=False)
        pos = 0
        with torch.no_grad():
            for seg, targets, _ in segments(stream, protocol, lm.start_id):
                _, key = reader(seg.ids.to(lm.device), seg.n)
                keys[pos: pos + seg.n] = key.cpu().numpy()
                values[pos: pos + seg.n] = targets.numpy()
                pos += seg.n
                if bar is not None:
                    bar.update(seg.n)
        if bar is not None:
            bar.close()
        keys.flush()
        del keys
        np.save(tmp / "values.npy", values)
        meta = {**ident, "model_name": lm.name, "n_keys": n, "dim": reader.dim,
                "build_seconds": time.perf_counter() - t0}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same datastore first
            shutil.rmtree(tmp, ignore_errors=True)


# -- search -------------------------------------------------------------------------------------
class KnnIndex:
    """faiss search over a datastore's keys: exact (IndexFlatL2) or IVF-PQ.

    IVF-PQ: `nlist` coarse cells, `code_size` bytes per key (8-bit sub-quantizers), `nprobe` cells
    searched; `rerank` > 0 fetches rerank*k candidates by PQ distance and returns the k nearest by
    exact distance over the full-precision keys (faiss IndexRefine). Distances are squared L2."""

    def __init__(self, store: Datastore, kind: str = "exact", nlist: int = 1024, code_size: int = 64,
                 nprobe: int = 32, rerank: int = 1, seed: int = 0):
        faiss = faiss_module()
        keys = np.ascontiguousarray(store.keys, dtype=np.float32)
        self.n, self.d = keys.shape
        self.kind = "exact" if kind == "auto" and self.n < AUTO_EXACT_MAX_KEYS else ("ivfpq" if kind == "auto" else kind)
        self.nlist, self.code_size, self.nprobe, self.rerank = nlist, code_size, nprobe, rerank
        if self.kind == "ivfpq" and self.d % code_size:
            raise TTABenchError(f"code_size {code_size} must divide the key dimension {self.d}; pick a divisor")
        if self.kind == "ivfpq" and self.n < max(nlist, 256):
            raise TTABenchError(f"IVF-PQ needs at least max(nlist, 256) keys, the datastore has {self.n};"
                                " lower nlist or use index: exact")
        flat = None
        if self.kind == "exact" or rerank > 0:
            flat = faiss.IndexFlatL2(self.d)
            with faiss_threads(self.n * self.d):
                flat.add(keys)
        if self.kind == "exact":
            self.index, self._parts = flat, (flat,)
            return
        path = store.folder / f"ivfpq-nlist{nlist}-m{code_size}-seed{seed}.faiss"
        if path.is_file():
            ivf = faiss.read_index(str(path))
        else:
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
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            faiss.write_index(ivf, str(tmp))
            tmp.rename(path)
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


class KnnMemory:
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

    def neighbours(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(tokens (n, k), weights (n, k), search flops) for queries q (n, d): the k nearest keys by
        squared L2 over the datastore and the online part, weights softmax(-dist / T) over them."""
        qn = q.detach().float().cpu().numpy()
        dist, ids = self.index.search(qn, self.k)
        dist, ids = torch.from_numpy(dist), torch.from_numpy(ids)
        tokens = self.values[ids.clamp(min=0)]
        flops = len(qn) * self.index.flops_per_query(self.k)
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


class ContinuousCache:
    """Grave et al. 2017: p_cache(w) proportional to sum over the last `window` positions i before t
    with x_{i+1} = w of exp(theta * h_t . h_i). Positions of earlier segments come from `add`
    (called after their tokens were scored); earlier positions of the segment being scored are used
    too, since their next tokens are inputs of that segment and so already scored."""

    def __init__(self, window: int, theta: float):
        self.window, self.theta = window, theta
        self.reset()

    def reset(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def weights(self, h: torch.Tensor, seg_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(tokens (n, E), weights (n, E), flops) for the segment's hidden states h (n, d); seg_next
        (n,): the token after each position (the last one unknown yet, never used)."""
        n = h.shape[0]
        keys = h if self.keys is None else torch.cat([self.keys.to(h.device), h])
        values = seg_next if self.values is None else torch.cat([self.values.to(h.device), seg_next])
        m = keys.shape[0] - n
        e = torch.arange(m + n, device=h.device)
        t = torch.arange(n, device=h.device)[:, None] + m  # each query's index in the same numbering
        valid = (e < t) & (e >= t - self.window)
        # float64: theta * h.h_i can be large, and float32 rounding of it would move p_cache visibly
        w = masked_softmax(self.theta * (h.double() @ keys.double().T), valid).float()
        # every row shares the entries: sum the weights per distinct token once, so mixing touches
        # each (row, token) cell once
        tokens, inv = torch.unique(values, return_inverse=True)
        w = torch.zeros(n, len(tokens), dtype=w.dtype, device=w.device).index_add_(1, inv, w)
        return tokens.expand(n, -1), w, float(valid.sum().item() * h.shape[1])

    def add(self, h: torch.Tensor, next_tokens: torch.Tensor) -> None:
        h, next_tokens = h.detach(), next_tokens.detach().long()
        if self.keys is not None:
            h, next_tokens = torch.cat([self.keys, h]), torch.cat([self.values, next_tokens])
        self.keys, self.values = h[-self.window:], next_tokens[-self.window:]


def segment_next_tokens(seg) -> torch.Tensor:
    """The token after each of the segment's last n input positions; the last (the segment's final
    target, not an input) is unknown at scoring time and filled with 0 (no query may use it)."""
    nxt = seg.ids[0, seg.ids.shape[1] - seg.n + 1:]
    return torch.cat([nxt, nxt.new_zeros(1)]).long()


# -- the parts the methods are made of ----------------------------------------------------------
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


def cache_problems(window: int, theta: float, lam: float, lam_name: str = "lam") -> list[str]:
    out = []
    if window < 1:
        out.append(f"window must be >= 1, got {window}")
    if theta < 0:
        out.append(f"theta must be >= 0, got {theta}")
    if not 0 <= lam < 1:
        out.append(f"{lam_name} must be in [0, 1), got {lam}")
    return out


def _protocol(method):
    from .evaluate import Protocol

    return method.protocol if method.protocol is not None else Protocol()


class KnnPart:
    """kNN-LM state of a method: the datastore's index, the online part, the mixing."""

    def __init__(self, method, p):
        self.method, self.p = method, p
        self.reader = KeyReader(method.lm, p.key)
        self.memory: KnnMemory | None = None
        self.info: dict = {}
        self._pending = None

    def prepare(self, data) -> None:
        p = self.p
        stream = data.load(limit_tokens=p.datastore_tokens)
        store = Datastore.build_or_load(self.reader, stream, _protocol(self.method))
        index = KnnIndex(store, p.index, p.nlist, p.code_size, p.nprobe, p.rerank, seed=self.method.seed)
        self.memory = KnnMemory(index, store.values, p.k, p.temperature)
        self.info = {"n_keys": len(store), "dim": index.d, "index": index.kind, "built_now": store.built_now,
                     "build_seconds": store.meta["build_seconds"], "folder": str(store.folder)}

    def reset(self) -> None:
        self.memory.reset()

    def apply(self, lp: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        tokens, weights, flops = self.memory.neighbours(key)
        self.method.ledger.add("search.knn", flops)
        self._pending = key
        return mix(lp, self.p.lam, tokens, weights)

    def adapt(self, targets: torch.Tensor) -> None:
        if self.p.online:
            self.memory.add(self._pending, targets)
        self._pending = None


class CachePart:
    """Continuous-cache state of a method over the final hidden states of the stream."""

    def __init__(self, method, window: int, theta: float, lam: float):
        self.method, self.lam = method, lam
        self.cache = ContinuousCache(window, theta)
        self._pending = None

    def reset(self) -> None:
        self.cache.reset()

    def apply(self, lp: torch.Tensor, h: torch.Tensor, seg) -> torch.Tensor:
        h = h.float()
        tokens, weights, flops = self.cache.weights(h, segment_next_tokens(seg).to(h.device))
        self.method.ledger.add("search.cache", flops)
        self._pending = h
        return mix(lp, self.lam, tokens, weights)

    def adapt(self, targets: torch.Tensor) -> None:
        self.cache.add(self._pending, targets)  # h_i with x_{i+1}, now that x_{i+1} has been scored
        self._pending = None
