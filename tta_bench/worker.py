"""Running cells in this process, for `run`, the remote executors and torchrun alike: checks first
(resume keys, split separation), then the cells without a current result, one model at a time,
each record written as it finishes. A cell that raises becomes a failed record."""
from __future__ import annotations

import json
import time
from pathlib import Path

from . import cellrun, tokenlog
from .cells import StreamCache
from .resume import resume_key, stale_reason
from .results import SCHEMA, atomic_write, cell_path, provenance, read_cell


class Worker:
    """Runs cells in this process: checks them (resume keys, split separation), skips those with a
    current result, runs the rest one model at a time, and writes each record as it finishes
    (`write=False`: returns them only, for a driver without this machine's filesystem)."""

    def __init__(self, cfg, device, progress=None, check=False, log=print, write=True):
        self.cfg, self.check, self.log, self.write = cfg, check, log, write
        self.show = cfg.progress if progress is None else progress
        self.models, self.streams = ModelCache(device, cfg.dtype, log), StreamCache()

    def keys(self, cells) -> dict:
        keys = {}
        for group in by_model(cells).values():
            lm = self.models.get(group[0].model)
            for c in group:
                keys[c.cell_id] = resume_key(c, lm, self.streams)
        return keys

    def todo(self, cells, keys, force, done: dict | None = None) -> list:
        """Cells without a current result here, or (`done`: cell id -> resume key) elsewhere."""
        run_dir, todo = self.cfg.run_dir, []
        for c in cells:
            why = None if force else stale_reason(cell_path(run_dir, c.cell_id), keys[c.cell_id])
            if why == "new" and (done or {}).get(c.cell_id) == keys[c.cell_id]:
                continue
            if not (force or why) and self.cfg.log_tokens:
                why = tokenlog.problem(run_dir, read_cell(cell_path(run_dir, c.cell_id))[0])
            if force or why:
                todo.append(c)
                if why and why != "new":
                    self.log(f"  recomputing {c.label}: {why}")
        self.log(f"{len(cells)} cells in {run_dir}: {len(cells) - len(todo)} done, {len(todo)} to run")
        return todo

    def run(self, cells, keys, force=False, done: dict | None = None) -> list[dict]:
        records = []
        for group in by_model(self.todo(cells, keys, force, done)).values():
            lm = self.models.get(group[0].model)
            for i, cell in enumerate(group, 1):
                self.log(f"[{i}/{len(group)}] {cell.label} on {cell.task['name']}:{cell.task['split']} seed {cell.seed}")
                record = _run_or_fail(cell, lm, self.streams, self.show, self.log, self.check, self.cfg.log_tokens)
                record["resume_key"] = keys[cell.cell_id]
                if self.write:
                    write_record(self.cfg.run_dir, record)
                records.append(record)
                self.log(record_summary(record))
        return records


def write_record(run_dir: Path, record: dict) -> None:
    """The cell file, and a failed cell's traceback in the log beside it."""
    record = dict(record)
    trace = record.pop("traceback", None)
    arrays = record.pop("token_arrays", None)
    if arrays is not None:  # written first: a record names only a log that is complete
        name = cell_path(run_dir, record["cell_id"]).with_suffix(tokenlog.SUFFIX).name
        record["token_log"] = {"file": name, "sha256": tokenlog.write(run_dir / "cells" / name, arrays),
                               "n_tokens": int(len(arrays["logprob"]))}
    if trace is not None:
        atomic_write(cell_path(run_dir, record["cell_id"]).with_suffix(".log"), trace)
    atomic_write(cell_path(run_dir, record["cell_id"]), json.dumps(record, indent=1, sort_keys=False))


def record_summary(record: dict) -> str:
    if record["status"] == "failed":
        return f"    FAILED: {record['reason']} (traceback in {record['log']})"
    m, c = record["metrics"], record["costs"]
    return (f"    token ppl {_num(m['token_ppl'], '.3f')}  bits/byte {_num(m['bits_per_byte'], '.4f')}  "
            f"{c['gflops_per_token']:.3f} GFLOPs/token  {c['tokens_per_second'] or 0:.0f} tok/s")


def _num(v, spec):
    return "n/a" if v is None else format(v, spec)


def _run_or_fail(cell, lm, streams, show, log, check, log_tokens=False) -> dict:
    """The cell's record; an exception in it gives a failed record and a traceback file, so the
    bench goes on (KeyboardInterrupt still stops the run). With log_tokens, the per-token log's
    arrays ride along under "token_arrays" until write_record stores them."""
    import traceback

    try:
        observer = tokenlog.TokenLog() if log_tokens else None
        record = cellrun.run_cell(cell, lm, streams, progress=show, log=log, observer=observer)
        if observer is not None:
            prep = cell.task["prepare_split"]
            ranks = tokenlog.frequency_ranks([d.ids for d in streams.get(lm, cell.task, prep, {}).docs] if prep else [], lm.vocab_size)
            record["token_arrays"] = observer.arrays([d["tokens"] for d in record["per_doc"]], ranks)
        record["status"] = "ok"
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return {"schema": SCHEMA, "cell_id": cell.cell_id, "label": cell.label, "config": cell.as_dict(),
                "status": "failed", "reason": f"{type(e).__name__}: {reason}"[:500], "log": f"{cell.cell_id}.log",
                "traceback": traceback.format_exc(), "provenance": provenance(lm.device, cell.seed)}
    if check:
        from .checks import check_cell, failures

        record["checks"] = check_cell(cell, record, lm)
        log("    checks: " + ("all pass" if record["checks"]["passed"] else "FAILED: " + "; ".join(failures(record["checks"]))))
    return record


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
        from .models import load_model

        key = json.dumps(spec, sort_keys=True)
        if key != self.key:
            self.lm = None  # free the previous model first
            t0 = time.perf_counter()
            extra = {k: v for k, v in spec.items() if k not in ("name", "label")}
            self.lm = load_model(spec["name"], device=str(self.device), dtype=self.dtype, **extra)
            self.key = key
            self.log(f"loaded {spec['name']} ({self.lm.source}) on {self.device} in {time.perf_counter() - t0:.1f}s")
        return self.lm
