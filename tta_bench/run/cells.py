"""One way to build a cell: a resolved cell -> (model, stream, prepared method), for `run`,
`prepare`, `check` and the benchmarks alike.

    built = build_cell(cell, lm, streams)       # the method made, seeded and prepared
    try:
        result = built.evaluate()              # the protocol over the evaluated stream (EvalResult)
    finally:
        built.close()                          # the shared model goes back as it was found
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass, field

from tta_bench.run.config import Cell
from tta_bench.protocol.stream import Draw, Stream, tokenize
from tta_bench.api.errors import TTABenchError
from tta_bench.api.method import Method, method_class
from tta_bench.prepare.prepared import PrepareData
from tta_bench.api.registry import get


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_protocol(cell_protocol: dict, lm):
    from tta_bench.protocol.evaluate import Protocol

    ctx = cell_protocol["context_len"]
    if ctx == "auto":
        ctx = lm.window - cell_protocol["segment_len"]
    if ctx < 1 or ctx + cell_protocol["segment_len"] - 1 > lm.window:
        raise TTABenchError(
            f"context_len {ctx} + segment_len {cell_protocol['segment_len']} - 1 exceeds the window of {lm.name}"
            f" ({lm.window} tokens); lower them"
        )
    return Protocol(cell_protocol["segment_len"], ctx, cell_protocol["reset"], cell_protocol.get("lanes", 1))


def draw_of(limits: dict) -> Draw | None:
    """The limits' document draw (limits.draw, draw_seed, min_doc_tokens); None: the first documents."""
    if limits.get("draw", "first") == "first" and not limits.get("min_doc_tokens"):
        return None
    return Draw(limits.get("draw") or "first", limits.get("min_doc_tokens") or 1, limits.get("draw_seed") or 0)


class StreamCache:
    """Tokenized streams per (model tokenizer, task entry, split, limits)."""

    def __init__(self):
        self.cache = {}
        self.texts = {}
        # select_on candidates' results, keyed by what they read (content_key): two tasks that tune on
        # the same text (a text task borrowing WikiText-2 valid) try each setting once
        self.tried = {}

    def content_key(self, lm, task_entry: dict, split: str, limits: dict) -> tuple:
        """What a stream is made of, whichever task names it: tokenizer, documents' text, limits."""
        key = (json.dumps(task_entry, sort_keys=True), split)
        if key not in self.texts:
            docs = get("task", task_entry["name"])(**task_entry["params"]).split_documents(split)
            self.texts[key] = docs, hashlib.sha256(json.dumps([(d.title, d.text) for d in docs]).encode()).hexdigest()
        return lm.fingerprint, self.texts[key][1], json.dumps(limits, sort_keys=True)

    def get(self, lm, task_entry: dict, split: str, limits: dict) -> Stream:
        key = (lm.fingerprint, json.dumps(task_entry, sort_keys=True), split, json.dumps(limits, sort_keys=True))
        if key not in self.cache:
            # the same text read by two tasks (a text task borrowing WikiText-2 valid) is tokenized once
            same = self.content_key(lm, task_entry, split, limits)
            docs = self.texts[(json.dumps(task_entry, sort_keys=True), split)][0]
            if same not in self.cache:
                self.cache[same] = tokenize(
                    docs,
                    lm.tokenizer,
                    task_entry["name"],
                    split,
                    limits.get("docs"),
                    limits.get("tokens"),
                    limits.get("doc_tokens"),
                    draw_of(limits),
                )
            self.cache[key] = dataclasses.replace(self.cache[same], task=task_entry["name"], split=split)
        return self.cache[key]


def prepare_data(cell: Cell, lm, streams: StreamCache, progress: bool = False, log=None, on_load=None) -> PrepareData:
    """The cell's prepare split, served only when it is not the evaluated one (SPEC 2); `on_load(stream)`
    sees every stream served (the checks compare them with the evaluated split)."""
    task, prep = cell.task, cell.task["prepare_split"]

    def load(limit_tokens=None, limit_docs=None):
        if prep is None:
            raise TTABenchError(
                f"method {cell.method['name']} needs a prepare split but task {task['name']} has none"
                f" besides '{task['split']}'; set `prepare_split` or provide the data"
            )
        if prep == task["split"]:
            raise TTABenchError("prepare may not see the evaluated split (SPEC 2)")
        stream = streams.get(lm, task, prep, {"docs": limit_docs, "tokens": limit_tokens})
        if on_load:
            on_load(stream)
        return stream

    kw = {"log": log} if log else {}
    return PrepareData(prep, load, lm, progress, **kw)


@dataclass
class PreparedCell:
    """A cell ready to evaluate: its model, protocol, evaluated stream and prepared method."""

    cell: Cell
    lm: object
    protocol: object
    method: Method
    params: object
    data: PrepareData
    stream: Stream | None
    prepare_seconds: float
    closed: bool = field(default=False)

    def evaluate(self, progress: bool = False, observer=None, stream: Stream | None = None):
        from tta_bench.protocol.evaluate import evaluate

        return evaluate(self.method, stream or self.stream, self.protocol, progress=progress, observer=observer)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.method.close()


def build_cell(
    cell: Cell,
    lm,
    streams: StreamCache | None = None,
    *,
    progress: bool = False,
    data: PrepareData | None = None,
    load_stream: bool = True,
    count_flops: bool = True,
) -> PreparedCell:
    """Make the cell's method (seeded from the cell), prepare it with its ledger off (prepare is
    reported as time, not per-token flops), and load the evaluated stream. `data`: another source
    for prepare (the checks audit what it serves); `load_stream=False`: prepare only;
    `count_flops=False`: evaluations leave the ledger off (the checks)."""
    import torch

    from tta_bench.protocol.flops import Ledger

    streams = streams or StreamCache()
    protocol = resolve_protocol(cell.protocol, lm)
    stream = streams.get(lm, cell.task, cell.task["split"], cell.limits) if load_stream else None
    if stream is not None and stream.n_tokens == 0:
        raise TTABenchError(
            f"task {cell.task['name']} {cell.task['split']} has no tokens after limits; raise the limits"
        )
    cls = method_class(cell.method["name"])
    params, errs = cls.make_params(cell.method["params"])
    if errs:
        raise TTABenchError(errs[0])
    seed_everything(cell.seed)
    lm.ledger = Ledger(lm.fingerprint, enabled=count_flops)
    method = cls(lm, params, seed=cell.seed, protocol=protocol)
    data = data or prepare_data(cell, lm, streams, progress)
    t0 = time.perf_counter()
    try:
        with lm.ledger.paused():  # prepare is reported as time and prepare FLOPs, not per scored token
            method.prepare(data)
            if lm.device.type == "cuda":
                torch.cuda.synchronize(lm.device)
    except BaseException:
        method.close()
        raise
    return PreparedCell(cell, lm, protocol, method, params, data, stream, time.perf_counter() - t0)


def chosen_cell(cell: Cell, params: dict) -> Cell:
    """A `select_on` cell with one setting of its grid: an ordinary cell (with an id of its own)."""
    return dataclasses.replace(cell, method={"name": cell.method["name"], "params": params}, selection=None)


def selection_cells(cell: Cell) -> list[Cell]:
    """A `select_on` cell's candidates, each on the selection split with a prepare split that is
    neither the selection split nor the evaluated one."""
    sel, task = cell.selection.split, cell.task
    if sel == task["split"]:
        raise TTABenchError(
            f"choosing a setting on the evaluated split '{sel}' is refused; set select_on to another split"
        )
    splits = [task["prepare_split"], *get("task", task["name"])(**task["params"]).available_splits()]
    prep = next((s for s in splits if s and s not in (sel, task["split"])), None)
    return [
        dataclasses.replace(chosen_cell(cell, params), task={**task, "split": sel, "prepare_split": prep})
        for params in cell.selection.grid
    ]
