"""Running cells in this process, for `run`, the remote executors and torchrun alike: checks first
(resume keys, split separation), then the cells without a current result, one model at a time,
each record written as it finishes. A cell that raises becomes a failed record."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from tta_bench.run import cellrun
from tta_bench.results import tokenlog
from tta_bench.run.cells import StreamCache
from tta_bench.run.options import RunOptions
from tta_bench.run.resume import resume_key, stale_reason
from tta_bench.results.records import CellRecord, cell_path, read_cell
from tta_bench.results.files import atomic_write
from tta_bench.results.provenance import provenance


class Worker:
    """Runs cells in this process: checks them (resume keys, split separation), skips those with a
    current result, runs the rest one model at a time, and writes each record as it finishes
    (`write=False`: returns them only, for a driver without this machine's filesystem). `options`:
    how (default: as the bench file says)."""

    def __init__(self, cfg, device, options: RunOptions | None = None, log=print, write=True):
        self.cfg, self.log, self.write = cfg, log, write
        self.options = RunOptions.resolve(cfg) if options is None else options
        self.models, self.streams = ModelCache(device, cfg.dtype, log), StreamCache()
        from tta_bench.protocol.shared_pass import SharedPasses

        self.passes = SharedPasses()

    def keys(self, cells) -> dict:
        keys = {}
        for group in by_model(cells).values():
            lm = self.models.get(group[0].model)
            for c in group:
                keys[c.cell_id] = resume_key(c, lm, self.streams)
        return keys

    def todo(self, cells, keys, done: dict | None = None) -> list:
        """Cells without a current result here, or (`done`: cell id -> resume key) elsewhere."""
        run_dir, force, todo = self.cfg.run_dir, self.options.force, []
        for c in cells:
            why = None if force else stale_reason(cell_path(run_dir, c.cell_id), keys[c.cell_id])
            if why == "new" and (done or {}).get(c.cell_id) == keys[c.cell_id]:
                continue
            if not (force or why) and self.options.log_tokens:
                why = tokenlog.problem(run_dir, read_cell(cell_path(run_dir, c.cell_id))[0])
            if force or why:
                todo.append(c)
                if why and why != "new":
                    self.log(f"  recomputing {c.label}: {why}")
        self.log(f"{len(cells)} cells in {run_dir}: {len(cells) - len(todo)} done, {len(todo)} to run")
        return todo

    def run(self, cells, keys, done: dict | None = None) -> list[CellRecord]:
        records = []
        for group in by_model(self.todo(cells, keys, done)).values():
            lm = self.models.get(group[0].model)
            for i, cell in enumerate(group, 1):
                self.log(
                    f"[{i}/{len(group)}] {cell.label} on {cell.task['name']}:{cell.task['split']} seed {cell.seed}"
                )
                lm.passes = self.passes  # the frozen base model's passes, shared by this run's cells
                try:
                    record = _run_or_fail(cell, lm, self.streams, self.options, self.log)
                finally:
                    lm.passes = None
                record.resume_key = keys[cell.cell_id]
                record.provenance["overrides"] = list(self.options.overrides)
                if self.write:
                    write_record(self.cfg.run_dir, record)
                records.append(record)
                self.log(record_summary(record))
        return records


def write_record(run_dir: Path, record: CellRecord) -> None:
    """The cell file; beside it, a failed cell's traceback and a logged cell's per-token log (written
    first: a record names only a log that is complete)."""
    path = cell_path(run_dir, record.cell_id)
    if record.token_arrays is not None:
        name = path.with_suffix(tokenlog.SUFFIX).name
        record = dataclasses.replace(
            record,
            token_log={
                "file": name,
                "sha256": tokenlog.write(run_dir / "cells" / name, record.token_arrays),
                "n_tokens": int(len(record.token_arrays["logprob"])),
            },
        )
    if record.traceback is not None:
        atomic_write(path.with_suffix(".log"), record.traceback)
    atomic_write(path, json.dumps(record.to_json(), indent=1, sort_keys=False))


def record_summary(record: CellRecord) -> str:
    if not record.ok:
        return f"    FAILED: {record.reason} (traceback in {record.log})"
    m, c = record.metrics, record.costs
    return (
        f"    token ppl {_num(m['token_ppl'], '.3f')}  bits/byte {_num(m['bits_per_byte'], '.4f')}  "
        f"{c['gflops_per_token']:.3f} GFLOPs/token  {c['tokens_per_second'] or 0:.0f} tok/s"
        + (f"  {c['lanes']} lanes" if "lanes" in c else "")
        + (f"\n    note: {c['lanes_note']}" if "lanes_note" in c else "")
    )


def _num(v, spec):
    return "n/a" if v is None else format(v, spec)


def _run_or_fail(cell, lm, streams: StreamCache, options: RunOptions, log) -> CellRecord:
    """The cell's record; an exception in it gives a failed record carrying its traceback, so the
    bench goes on (KeyboardInterrupt still stops the run). With log_tokens, the per-token log's
    arrays ride along (token_arrays) until write_record stores them; with check, the record holds
    the validity checks of its setting."""
    import traceback

    try:
        record = _run(cell, lm, streams, options, log)
    except Exception as e:
        return _failed(cell, lm, e, traceback.format_exc())
    if options.check:
        from tta_bench.checks.validity import check_cell, failures

        record.checks = check_cell(cell, record.to_json(), lm)
        log(
            "    checks: "
            + ("all pass" if record.checks["passed"] else "FAILED: " + "; ".join(failures(record.checks)))
        )
    return record


def _run(cell, lm, streams: StreamCache, options: RunOptions, log) -> CellRecord:
    """The evaluated cell's record; with log_tokens, the arrays of its per-token log too."""
    observer = tokenlog.TokenLog() if options.log_tokens else None
    record = cellrun.run_cell(cell, lm, streams, progress=options.progress, log=log, observer=observer)
    if observer is not None:
        prep = cell.task["prepare_split"]
        docs = streams.get(lm, cell.task, prep, {}).docs if prep else []
        record.token_arrays = observer.arrays(
            record.doc_tokens, tokenlog.frequency_ranks([d.ids for d in docs], lm.vocab_size)
        )
    return record


def _failed(cell, lm, error: Exception, trace: str) -> CellRecord:
    """A failed cell's record: the exception's first line as its reason, the traceback for its log."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return CellRecord(
        cell_id=cell.cell_id,
        label=cell.label,
        config=cell.as_dict(),
        status="failed",
        reason=f"{type(error).__name__}: {reason}"[:500],
        log=f"{cell.cell_id}.log",
        traceback=trace,
        provenance=provenance(lm.device, cell.seed),
    )


def by_model(cells: list) -> dict[str, list]:
    """The cells of each model, in order."""
    groups: dict[str, list] = {}
    for c in cells:
        groups.setdefault(json.dumps(c.model, sort_keys=True), []).append(c)
    return groups


class ModelCache:
    """Loads one model at a time and keeps the last one: the checks before a run and the run itself
    share it."""

    def __init__(self, device, dtype: str, log=print):
        self.device, self.dtype, self.log = device, dtype, log
        self.key, self.lm = None, None

    def get(self, spec: dict):
        from tta_bench.protocol.models import load_model

        key = json.dumps(spec, sort_keys=True)
        if key != self.key:
            self.lm = None  # free the previous model first
            t0 = time.perf_counter()
            extra = {k: v for k, v in spec.items() if k not in ("name", "label", "dtype")}
            dtype = spec.get("dtype", self.dtype)  # a model's own dtype wins over the bench's
            self.lm = load_model(spec["name"], device=str(self.device), dtype=dtype, **extra)
            self.key = key
            self.log(f"loaded {spec['name']} ({self.lm.source}) on {self.device} in {time.perf_counter() - t0:.1f}s")
        return self.lm
