"""What `prepare` receives (SPEC 2: never the evaluated split), and the one cache for prepared state.

- `load(limit_tokens)`: the prepare split, tokenized.
- `features(stream, protocol)`: the base model's final hidden states and last feed-forward inputs at
  every position, read as the protocol reads text: one pass per (model, split, protocol) serves every
  method and cell, kept on disk in parts of whole documents (a longer request extends it; a pass cut
  short resumes at its last part).
- `segments(stream, protocol)`: the stream's segments, targets attached (gradient statistics).
- `cached(kind, stream, params, build)`: a folder of prepared state keyed by model fingerprint,
  prepare-data fingerprint and params; built in a temporary folder and renamed (whole or absent).
Every hit and miss goes to `events` (kept in the cell record, reported by `run` and `prepare`).
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from tta_bench.protocol.stream import Stream
from tta_bench._paths import cache_dir
from tta_bench.api.errors import TTABenchError

FEATURES = ("hidden", "ffn_input")
PART_TOKENS = 32768  # the pass writes a part (whole documents) at least this often
BATCH = 8  # consecutive inputs of one shape and document per forward


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class PrepareData:
    """The split `prepare` may use, and the harness's services over it (see the module docstring)."""

    split: str | None
    load: Callable[..., Stream]  # load(limit_tokens=None, limit_docs=None) -> Stream
    lm: object = None
    progress: bool = False
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)
    root: Path = field(default_factory=cache_dir)  # the cache
    events: list = field(default_factory=list)

    def segments(self, stream: Stream, protocol):
        """The stream's segments under `protocol`, ids and targets on the model's device."""
        from tta_bench.protocol.evaluate import segments

        for seg, targets, _ in segments(stream, protocol, self.lm.start_id):
            seg.ids, seg.targets = seg.ids.to(self.lm.device), targets.to(self.lm.device)
            yield seg

    def cached(self, kind: str, stream: Stream | None, params: dict, build: Callable[[Path], dict | None]) -> Path:
        """The folder of prepared state `kind` for this model, data and params; `build(folder)` fills a
        new one (returning info to keep in its meta.json) when there is none."""
        lm = self.lm
        key = {
            "kind": kind,
            "model": lm.fingerprint,
            "dtype": str(lm.dtype),
            "params": params,
            "data": None if stream is None else [stream.fingerprint, stream.n_tokens],
        }  # by content: two tasks
        # that serve the same prepare text (a text task borrowing WikiText-2 valid) share the state
        folder = self.root / "prepared" / kind / digest(key)
        if (folder / "meta.json").is_file():
            meta = json.loads((folder / "meta.json").read_text())  # what building it cost, reported on every hit
            self.events.append(
                {
                    "kind": kind,
                    "hit": True,
                    "folder": str(folder),
                    "build_seconds": meta.get("seconds"),
                    "flops": meta.get("flops"),
                    "info": meta.get("info"),
                }
            )
            self.events.extend(
                meta.get("nested", [])
            )  # and what its build used (the shared pass): a hit costs what a miss did
            return folder
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0, before = time.perf_counter(), len(self.events)
        try:
            info, flops, seconds = counted(lambda: build(tmp) or {})
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            nested = [{**e, "hit": True} for e in self.events[before:]]
            meta = {"key": key, "info": info, "seconds": seconds, "flops": flops, "created": now, "nested": nested}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            tmp.rename(folder)
        except OSError:  # another process finished the same state first
            if not (folder / "meta.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.events.append(
            {
                "kind": kind,
                "hit": False,
                "seconds": time.perf_counter() - t0,
                "build_seconds": seconds,
                "flops": flops,
                "folder": str(folder),
                "info": info,
            }
        )
        return folder

    def features(self, stream: Stream, protocol, tail: str = "protocol") -> list[dict]:
        """Per document of `stream`, {name: (len(doc), d) float32 CPU tensor} for the names in FEATURES
        the model has; row p is the position that predicts the document's token p.

        tail "protocol": every segment as the protocol reads it (a short last segment is left-filled
        with earlier tokens). tail "short" (context_len 1, reset document only): non-overlapping
        windows of segment_len from each document's start, the last one holding only its own tokens,
        so a document's features do not depend on how long the document is."""
        import torch

        if tail not in ("protocol", "short"):
            raise TTABenchError(f"features: tail must be protocol or short, got {tail!r}")
        if tail == "short" and (protocol.context_len != 1 or protocol.reset != "document"):
            raise TTABenchError("features: tail 'short' needs context_len 1 and reset document")
        complete = len(stream.docs) - int(stream.cut)
        t0 = time.perf_counter()
        store = FeatureStore(self, protocol, stream)
        computed, index = store.extend(stream, complete)
        out = store.read(stream, complete, index)
        self._pass_event(store, index, computed, stream, t0)
        S = protocol.segment_len
        tails = [
            d
            for d in range(complete)
            if tail == "short" and len(stream.docs[d].ids) > S and len(stream.docs[d].ids) % S
        ]
        if tails or stream.cut:  # rows that differ from the pass's: kept as prepared state of their own
            self._overlay_edges(out, stream, protocol, tail, tails, complete, store)
        return [{k: torch.from_numpy(v) for k, v in doc.items()} for doc in out]

    def _pass_event(self, store, index: dict, computed: int, stream: Stream, t0: float) -> None:
        """The features event. A hit: the shared pass had every complete document; its cost is counted
        for every cell that reads it, in proportion to the tokens read."""
        per_token = index.get("flops", 0.0) / max(index.get("tokens", 0), 1)
        per_second = index.get("seconds", 0.0) / max(index.get("tokens", 0), 1)
        self.events.append(
            {
                "kind": "features",
                "hit": computed == 0,
                "pass_tokens": computed,
                "tokens": stream.n_tokens,
                "seconds": time.perf_counter() - t0,
                "folder": str(store.folder),
                "build_seconds": per_second * stream.n_tokens,
                "flops": per_token * stream.n_tokens,
            }
        )

    def _overlay_edges(self, out: list, stream: Stream, protocol, tail: str, tails: list, complete: int, store) -> None:
        """Write over `out` the rows that differ from the shared pass's (each document's partial last
        window under tail "short", a cut document's last segment), computed once and cached."""

        def build(folder):
            arrays = {}
            if tails:  # each document's partial last window, from its own tokens only
                rows = compute(self.lm, stream, protocol, range(tails[0], tails[-1] + 1), "short", only_tail=True)
                arrays.update({f"{d}:{k}": v for d in tails for k, v in rows[d].items()})
            if stream.cut:  # the cut document: its last segment differs from the uncut document's
                cut = compute(self.lm, stream, protocol, range(complete, len(stream.docs)), tail)[complete]
                arrays.update({f"{complete}:{k}": v for k, v in cut.items()})
            np.savez(folder / "edges.npz", **arrays)
            return {"tokens": sum(len(v) for k, v in arrays.items() if k.endswith(":hidden"))}

        folder = self.cached("feature-edges", stream, {"pass": store.key, "tail": tail}, build)
        with np.load(folder / "edges.npz") as edges:
            for key in edges.files:
                d, name = key.split(":")
                d, rows = int(d), edges[key]
                if d == len(out):
                    out.append({})
                if name in out[d]:
                    out[d][name][len(out[d][name]) - len(rows) :] = rows
                else:
                    out[d][name] = rows


_OPEN: list = []  # [flops, seconds] of the counted regions nested in each open one


def counted(fn):
    """(fn(), the flops it ran, its seconds): flops by FlopCounterMode, halved to fvcore's convention
    (SPEC 5). A region nested in another (the shared features pass inside a training run) is charged
    to itself only, so that whether it was cached or not, no cost is counted twice."""
    from tta_bench.protocol.flops import dispatch_flops

    out, t0 = [], time.perf_counter()
    _OPEN.append([0.0, 0.0])
    try:
        flops = dispatch_flops(lambda: out.append(fn()))
    finally:
        nested = _OPEN.pop()
    seconds = time.perf_counter() - t0
    if _OPEN:
        _OPEN[-1][0] += flops - nested[0]
        _OPEN[-1][1] += seconds - nested[1]
    return out[0], flops - nested[0], seconds - nested[1]


def compute(lm, stream: Stream, protocol, docs: range, tail: str, only_tail: bool = False, bar=None) -> dict[int, dict]:
    """{document: features} for the documents in `docs` (see PrepareData.features), BATCH inputs of one
    shape and document per forward; `only_tail`: just the rows of each partial last segment."""
    import torch

    from tta_bench.protocol.evaluate import segments

    try:
        lm.last_ffn()
        names = FEATURES
    except TTABenchError:  # no feed-forward layer found: hidden states only
        names = FEATURES[:1]
    out: dict[int, dict] = {}  # np.empty touches no memory until rows are written
    S = protocol.segment_len

    def run(group):
        ids = torch.cat([s.ids for s in group]).to(lm.device)
        with torch.no_grad():
            h, f = lm.hidden_and_ffn_input(ids) if len(names) == 2 else (lm.hidden(ids), None)
        n = group[0].n
        for i, seg in enumerate(group):
            doc = out.setdefault(
                seg.doc, {k: np.empty((len(stream.docs[seg.doc].ids), lm.hidden_size), np.float32) for k in names}
            )
            rows = slice(seg.start, seg.start + seg.n)
            doc["hidden"][rows] = h[i, -n:].float().cpu().numpy()
            if f is not None:
                doc["ffn_input"][rows] = f[i, -n:].float().cpu().numpy()
        if bar is not None:
            bar.update(n * len(group))

    group = []
    for seg, _, _ in segments(stream, protocol, lm.start_id):
        if seg.doc < docs.start:
            continue
        if seg.doc >= docs.stop:
            break
        partial_last = seg.start + seg.n == len(stream.docs[seg.doc].ids) and seg.n < S
        if only_tail and not partial_last:
            continue
        if tail == "short" and partial_last:
            seg.ids = seg.ids[:, -seg.n :]  # the window's own tokens only
        if group and (
            len(group) == BATCH or group[0].doc != seg.doc or group[0].ids.shape != seg.ids.shape or group[0].n != seg.n
        ):
            run(group)
            group = []
        group.append(seg)
    if group:
        run(group)
    if only_tail:
        return {d: {k: v[len(v) - len(v) % S :] for k, v in doc.items()} for d, doc in out.items()}
    return out


def _doc_hash(ids) -> str:
    return hashlib.sha1(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


class FeatureStore:
    """The cached pass of one (model, task split, protocol): index.json lists each part's documents
    and every document's hash; parts are .npy files of whole documents, each written atomically."""

    def __init__(self, data: PrepareData, protocol, stream: Stream):
        lm = data.lm
        self.data, self.lm, self.protocol = data, lm, protocol
        # keyed by content (the first document), not by task name: tasks that serve the same text share the pass
        first = _doc_hash(stream.docs[0].ids) if stream.docs else ""
        self.key = {
            "model": lm.fingerprint,
            "dtype": str(lm.dtype),
            "first_doc": first,
            "protocol": [protocol.segment_len, protocol.context_len, protocol.reset],
            "version": 2,
        }
        self.folder = data.root / "features" / f"{lm.name.replace('/', '_')}-{data.split}-{digest(self.key)}"

    @contextmanager
    def _locked(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # one process extends the pass at a time
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _index(self) -> dict:
        path = self.folder / "index.json"
        if path.is_file():
            return json.loads(path.read_text())
        return {"key": self.key, "docs": [], "parts": []}

    def _write_index(self, index: dict) -> None:
        tmp = self.folder / f".index.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(index))
        os.replace(tmp, self.folder / "index.json")

    def extend(self, stream: Stream, complete: int) -> tuple[int, dict]:
        """Compute the documents [0, complete) the pass lacks; returns the number of tokens computed and the index."""
        with self._locked():
            index = self._index()
            hashes = [_doc_hash(d.ids) for d in stream.docs[:complete]]
            n = min(len(index["docs"]), complete)
            if index["docs"][:n] != hashes[:n]:
                self.data.log(f"features in {self.folder} were computed from other text; computing them again")
                for f in self.folder.glob("part-*"):
                    f.unlink()
                index = {"key": self.key, "docs": [], "parts": []}
            done = len(index["docs"])
            todo = sum(len(d.ids) for d in stream.docs[done:complete])
            if done >= complete:
                return 0, index
            bar = None
            if self.data.progress:
                from tqdm.auto import tqdm

                bar = tqdm(
                    total=todo,
                    unit="tok",
                    desc=f"base features {stream.task}:{stream.split}",
                    mininterval=2.0,
                    leave=False,
                )
            d0 = done
            while d0 < complete:
                d1, n = d0, 0
                while d1 < complete and (n < PART_TOKENS or d1 == d0):
                    n, d1 = n + len(stream.docs[d1].ids), d1 + 1
                computed, flops, seconds = counted(
                    lambda: compute(self.lm, stream, self.protocol, range(d0, d1), "protocol", bar=bar)
                )
                docs = [computed[d] for d in range(d0, d1)]
                # the pass's cost so far, so a cell reading part of it is charged its share
                index["flops"] = index.get("flops", 0.0) + flops
                index["seconds"] = index.get("seconds", 0.0) + seconds
                index["tokens"] = index.get("tokens", 0) + sum(len(d.ids) for d in stream.docs[d0:d1])
                part = {"docs": [d0, d1], "file": f"part-{d0:07d}-{d1:07d}", "names": sorted(docs[0])}
                for name in part["names"]:
                    tmp = self.folder / f".{part['file']}-{name}.tmp{os.getpid()}.npy"
                    np.save(tmp, np.concatenate([doc[name] for doc in docs]))
                    os.replace(tmp, self.folder / f"{part['file']}-{name}.npy")
                index["parts"].append(part)
                index["docs"] += hashes[d0:d1]
                self._write_index(index)
                d0 = d1
            if bar is not None:
                bar.close()
            return todo, index

    def read(self, stream: Stream, complete: int, index: dict) -> list[dict]:
        """Features of documents [0, complete) (`index`: what extend returned), as float32 arrays in memory."""
        out = []
        for part in index["parts"]:
            d0, d1 = part["docs"]
            if d0 >= complete:
                break
            arrays = {
                name: np.load(self.folder / f"{part['file']}-{name}.npy", mmap_mode="r") for name in part["names"]
            }
            offset = 0
            for d in range(d0, min(d1, complete)):
                n = len(stream.docs[d].ids)
                out.append({k: np.array(v[offset : offset + n]) for k, v in arrays.items()})
                offset += n
        return out
