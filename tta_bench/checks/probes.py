"""What the validity checks (SPEC 6) look at a method with: what prepare opened and loaded, the
evaluated split as the checks cut it, perturbed copies of a stream, random states, and snapshots of
the shared model.

- `opened_files()`: every file this process opens inside a block (Python's audit hook sees open()).
- `CheckData`: the task as the checks see it: the prepare loader (recording what it served) and
  the evaluated split, read only when asked for.
- `CheckInstance`: one prepared method, built as a cell builds it, that records the files each of its
  phases opens; each evaluation starts from the same random state.
- `perturbed(stream, t)`: every token from position t on replaced by another one.
- `shared_runs(loaded, evaluated, k)`: how much of what prepare loaded shares k-token runs with the
  evaluated stream.
- `Snapshot(model)`: the shared model's weights and flags, to see (and undo) what a method left behind.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
import random
from contextlib import contextmanager

from tta_bench.api.errors import TTABenchError
from tta_bench.checks.separation import opened_files, read_split, real_paths  # noqa: F401  (the checks import them from here)


@contextmanager
def files_by_phase(method, phases, opened_in: dict):
    """Inside the block, the files each of the method's `phases` (e.g. score, adapt) opens are added
    to opened_in[phase]."""

    def watched(fn, phase):
        def call(*args):
            with opened_files() as seen:
                out = fn(*args)
            opened_in.setdefault(phase, set()).update(real_paths(seen))
            return out

        return call

    for phase in phases:
        setattr(method, phase, watched(getattr(type(method), phase).__get__(method), phase))
    try:
        yield
    finally:
        for phase in phases:
            delattr(method, phase)


# -- data ---------------------------------------------------------------------------------------
class CheckData:
    """The task as the checks see it: the prepare loader (recording what it served) and the
    evaluated split, read only when asked for."""

    def __init__(self, lm, task: dict, limits: dict | None = None):
        from tta_bench.run.cells import StreamCache
        from tta_bench.api.registry import get

        self.lm, self.entry, self.limits = lm, task, limits or {}
        self.split, self.prep = task["split"], task.get("prepare_split")
        self.task_cls = get("task", task["name"])
        self.loads: list = []  # every stream PrepareData.load returned (cells.prepare_data's on_load)
        self.streams = StreamCache()  # shared by the instances of one check: the prepare split is read once

    def _task(self):
        return self.task_cls(**self.entry["params"])  # a fresh object: no cached documents

    def evaluated_files(self) -> set[str]:
        """Files the task opens to read the evaluated split but not to read the prepare split."""
        ev = read_split(self._task(), self.split)[1]
        prep = read_split(self._task(), self.prep)[1] if self.prep is not None else set()
        return {p for p in ev - prep if os.path.isfile(p)}

    def evaluated_stream(self):
        """The evaluated split as the cell sees it (the cell's limits)."""
        from tta_bench.protocol.stream import tokenize

        return tokenize(
            self._task().split_documents(self.split),
            self.lm.tokenizer,
            self.entry["name"],
            self.split,
            self.limits.get("docs"),
            self.limits.get("tokens"),
            self.limits.get("doc_tokens"),
        )

    def check_stream(self, lengths):
        """The first documents of the evaluated split long enough for `lengths`, each cut to it."""
        from tta_bench.protocol.stream import Stream, TokenizedDoc, tokenize

        docs, found = [], []
        for doc in self._task().split_documents(self.split):
            if len(docs) == len(lengths):
                break
            ids = tokenize([doc], self.lm.tokenizer, "", "").docs
            n = len(ids[0].ids) if ids else 0
            found.append(n)
            if n >= lengths[len(docs)]:
                docs.append(TokenizedDoc(doc.title, ids[0].ids[: lengths[len(docs)]], 0, 0))
        if len(docs) < len(lengths):
            raise TTABenchError(
                f"the checks need {len(lengths)} documents of at least {', '.join(map(str, lengths))} tokens in"
                f" {self.entry['name']}:{self.split}, found lengths {found[:10]}; use a task with longer documents"
            )
        return Stream(self.entry["name"], self.split, docs, "check")


# -- running a method ---------------------------------------------------------------------------
class CheckInstance:
    """One prepared method, built as every cell is (cells.build_cell); each evaluation starts from the
    same random state. `reset`: its protocol's reset policy; `opened_in`: phase -> files it opened."""

    def __init__(self, cls, params, lm, seed, protocol, data: CheckData):
        from tta_bench.run.cells import build_cell, prepare_data
        from tta_bench.run.config import Cell

        method = {"name": cls.registry_name, "params": dataclasses.asdict(params)}
        cell = Cell(
            {"name": lm.name},
            data.entry,
            method,
            seed,
            {"segment_len": protocol.segment_len, "context_len": protocol.context_len, "reset": protocol.reset},
            {},
            str(lm.dtype).replace("torch.", ""),
            lm.device.type,
        )
        prep = prepare_data(cell, lm, data.streams, on_load=data.loads.append)
        with opened_files() as opened:
            self.built = build_cell(cell, lm, data=prep, load_stream=False, count_flops=False)
        self.method, self.reset = self.built.method, protocol.reset
        self.opened_in = {"prepare": set(real_paths(opened))}  # phase -> files it opened
        self.rng = rng_state()

    def run(self, stream, base=None, t=None):
        """(nll_sum, rows): rows are all log-probabilities (N, V) in stream order; with `base` and t,
        rows[i] is instead the largest change against base[i] for i <= t (0 beyond t)."""
        import torch

        offsets = doc_offsets(stream)
        V = self.method.lm.vocab_size
        rows = torch.zeros(offsets[-1]) if base is not None else torch.empty(offsets[-1], V)

        def observe(seg, logprobs, targets):
            a = offsets[seg.doc] + seg.start
            lp = logprobs.float().cpu()
            if base is None:
                rows[a : a + seg.n] = lp
            elif a <= t:
                b = min(a + seg.n, t + 1)
                rows[a:b] = max_change(lp[: b - a], base[a:b])

        set_rng(self.rng)
        with files_by_phase(self.method, ("reset", "score", "adapt"), self.opened_in):
            result = self.built.evaluate(observer=observe, stream=stream)
        return math.fsum(result.doc_nll), rows

    def close(self):
        self.built.close()


def doc_offsets(stream) -> list[int]:
    """The flat position where each document of the stream starts, and the stream's length last."""
    offsets = [0]
    for d in stream.docs:
        offsets.append(offsets[-1] + len(d.ids))
    return offsets


def where(offsets: list[int], pos: int) -> str:
    """A flat position of the stream as the checks' messages name it."""
    d = bisect.bisect_right(offsets, pos) - 1
    return f"position {pos} (doc {d}, token {pos - offsets[d]})"


def perturbed(stream, t: int, vocab_size: int, seed: int = 0):
    """The stream with every token from flat position t on replaced by a different random token."""
    import torch

    from tta_bench.protocol.stream import Stream

    g = torch.Generator().manual_seed(seed * 1_000_003 + t)
    docs, offset = [], 0
    for d in stream.docs:
        ids = list(d.ids)
        a = max(0, t - offset)
        if a < len(ids):
            old = torch.tensor(ids[a:])
            shift = torch.randint(1, vocab_size, (len(old),), generator=g)
            ids[a:] = ((old + shift) % vocab_size).tolist()
        docs.append(dataclasses.replace(d, ids=ids))
        offset += len(d.ids)
    return Stream(stream.task, stream.split, docs, f"{stream.fingerprint}+perturbed@{t}")


def shared_runs(loaded, evaluated, k: int) -> tuple[int, int]:
    """(tokens of `loaded` inside a run of k tokens that also occurs in `evaluated`, tokens of `loaded`)."""
    import numpy as np

    from tta_bench.checks.separation import contains, run_hashes, stream_runs

    ev = stream_runs([d.ids for d in evaluated.docs], k)
    shared = total = 0
    for d in loaded.docs:
        total += len(d.ids)
        hit = contains(ev, run_hashes(d.ids, k)).astype(np.int64)
        if hit.any():  # a hit at i covers tokens i .. i+k-1
            shared += int((np.convolve(hit, np.ones(k, dtype=np.int64))[: len(d.ids)] > 0).sum())
    return shared, total


def rng_state():
    import numpy as np
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def set_rng(state):
    import numpy as np
    import torch

    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])
    if state[3] is not None:
        torch.cuda.set_rng_state_all(state[3])


def max_change(a, b):
    """Per row, the largest |a - b| over the vocabulary (equal infinities count as no change, NaN as infinite)."""
    import torch

    d = (a - b).abs()
    d = torch.where(a == b, torch.zeros_like(d), d)
    return torch.nan_to_num(d, nan=math.inf).max(-1).values


class Snapshot:
    """The shared model's weights and requires_grad flags, to see (and undo) what a method left behind."""

    def __init__(self, model):
        self.model = model
        self.values = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.flags = {k: p.requires_grad for k, p in model.named_parameters()}

    def problems_and_restore(self) -> list[str]:
        import torch

        out = []
        state = self.model.state_dict(keep_vars=True)
        changed = []
        for k, v in self.values.items():
            now = state[k].detach()
            if now.shape != v.shape or not torch.equal(now, v):
                size = (now.double() - v.double()).abs().max().item() if now.shape == v.shape else math.inf
                changed.append((k, size))
                with torch.no_grad():
                    if now.shape == v.shape:
                        state[k].data.copy_(v)
                    else:
                        state[k].data = v.clone()
        if changed:
            k, size = max(changed, key=lambda c: c[1])
            out.append(
                f"after close() {len(changed)} of the shared model's {len(self.values)} tensors differ from"
                f" before the method ran (largest change {size:.3g}, in {k}); restore the weights in close()"
            )
        flips = [k for k, p in self.model.named_parameters() if p.requires_grad != self.flags[k]]
        for k, p in self.model.named_parameters():
            p.requires_grad_(self.flags[k])
        if flips:
            out.append(
                f"after close() requires_grad of {len(flips)} parameters differs from before (e.g. {flips[0]});"
                " give the flags back in close()"
            )
        return out


def jsonable(v):
    try:
        json.dumps(v)
        return v
    except TypeError:
        if isinstance(v, dict):
            return {str(k): jsonable(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [jsonable(x) for x in v]
        return repr(v)
