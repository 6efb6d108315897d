"""Turn a bench file into cell records (preflight, resume, load, prepare, evaluate, cost, write), and
`prepare`: every cell's preparation ahead of time, so that a later `run` only evaluates."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from . import config as config_mod
from .cells import StreamCache, build_cell, selection_cells
from .resume import resume_key, stale_reason
from .errors import RunFailed, TTABenchError
from .results import SCHEMA, RunLock, atomic_write, cell_path, device_name, provenance, writable_problem


def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)  # memory kept by _retain_freed_memory goes back first
    try:  # Linux: writing 5 resets the peak RSS (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _glibc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _retain_freed_memory() -> None:
    """glibc hands big freed blocks back to the OS, so tensors allocated afresh every segment (a
    backward's vocab x d head gradient, logits) page-fault again each time: up to a fifth of a
    weight-adapting segment on CPU. Keep them in the heap while a cell runs (process-wide, set
    before any cell so that `none` and every method are timed alike; _peak_reset trims the heap
    between cells so peaks stay per cell). No-op off glibc."""
    import ctypes

    libc = _glibc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, ctypes.c_int(1 << 30))  # M_MMAP_THRESHOLD: heap, not mmap, below 1 GiB
        libc.mallopt(-1, ctypes.c_int(2**31 - 1))  # M_TRIM_THRESHOLD: do not give the heap top back


def _peak_read(device) -> tuple[int, str]:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak_rss"
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss_since_start"


def preflight(cfg: config_mod.BenchConfig) -> None:
    problem = writable_problem(cfg.run_dir)
    if problem:
        raise TTABenchError(problem)


def run_cell(cell: config_mod.Cell, lm, streams: StreamCache, progress: bool = True, observer=None, log=None) -> dict:
    """Evaluate one cell and return its record (not yet written)."""
    if "grid" in cell.method:
        return run_selected(cell, lm, streams, progress, observer, log)
    if lm.device.type == "cpu":
        _retain_freed_memory()
    built = build_cell(cell, lm, streams, progress=progress)
    if log:
        log("    prepare: " + prepare_summary(built.data.events, built.prepare_seconds))
    return make_record(built, evaluate_cell(built, progress, observer))


def evaluate_cell(built, progress: bool = False, observer=None, stream=None):
    """Evaluate a built cell as `run` does (freed memory kept in the heap, peak memory counted from
    here), then close it: the loaded model is shared by the next cells."""
    if built.lm.device.type == "cpu":
        _retain_freed_memory()
    try:
        _peak_reset(built.lm.device)
        return built.evaluate(progress=progress, observer=observer, stream=stream)
    finally:
        built.close()


def prepare_summary(events: list[dict], seconds: float) -> str:
    """One line: what prepare found in the cache and what it had to compute."""
    if not events:
        return f"nothing to prepare ({seconds:.1f}s)"
    parts = []
    for e in events:
        if e["kind"] == "features":
            parts.append("features cached" if e["hit"] else f"features computed for {e['pass_tokens']} tokens")
        else:
            parts.append(f"{e['kind']} cached" if e["hit"] else f"{e['kind']} built in {e['seconds']:.1f}s")
    return "; ".join(parts) + f" ({seconds:.1f}s)"


def make_record(built, result) -> dict:
    """The cell record (SPEC 7) of an evaluated cell."""
    from .method import method_class
    from .metrics import bootstrap_ci, summarize

    cell, lm, stream, protocol, params = built.cell, built.lm, built.stream, built.protocol, built.params
    cls = method_class(cell.method["name"])
    device = lm.device
    peak, peak_kind = _peak_read(device)
    costs = lm.ledger.resolve()
    n_tokens = stream.n_tokens
    flops_per_token = {k: v / n_tokens for k, v in costs["flops"].items()}
    timed = result.seconds[1:] if len(result.seconds) > 1 else result.seconds
    timed_tokens = sum(result.seg_tokens[1:]) if len(result.seconds) > 1 else sum(result.seg_tokens)
    eval_s, eval_all, warmup = sum(timed), sum(result.seconds), len(result.seconds) - len(timed)
    if "ranks" in result.extra:  # documents shared out by torchrun: the slowest rank's time, all ranks' tokens
        eval_s, eval_all, timed_tokens, warmup = (result.extra[k] for k in ("eval_seconds", "eval_seconds_all",
                                                                           "timed_tokens", "warmup_segments"))

    docs = stream.docs
    d_nll, d_tok = result.doc_nll, result.doc_tokens
    d_bytes, d_words = [d.n_bytes for d in docs], [d.n_words for d in docs]
    metrics = summarize(sum(d_nll), n_tokens, sum(d_bytes), sum(d_words))
    metrics["ci95"] = bootstrap_ci(d_nll, d_tok, d_bytes, d_words, seed=cell.seed)
    return {
        "schema": SCHEMA,
        "cell_id": cell.cell_id,
        "label": cell.label,
        "config": cell.as_dict(),
        "resolved": {"segment_len": protocol.segment_len, "context_len": protocol.context_len, "reset": protocol.reset,
                     "prepare_split": cell.task["prepare_split"], "model_window": lm.window, "model_source": lm.source,
                     "model_fingerprint": lm.fingerprint, "method_params": {k: getattr(params, k) for k in cls.param_fields()}},
        "stream": {"task": stream.task, "split": stream.split, "fingerprint": stream.fingerprint,
                   "n_docs": len(docs), "n_tokens": n_tokens},
        "metrics": metrics,
        "per_doc": [{"title": d.title, "nll": n, "tokens": t, "bytes": d.n_bytes, "words": d.n_words}
                    for d, n, t in zip(docs, d_nll, d_tok)],
        "costs": {
            "flops": costs["flops"],
            "flops_per_token": flops_per_token,
            "gflops_per_token": sum(flops_per_token.values()) / 1e9,
            "unsupported_ops": costs["unsupported_ops"],
            "flop_convention": "fvcore: one multiply-add = one flop; backward/update via FlopCounterMode halved",
            "eval_seconds": eval_s,
            "eval_seconds_all": eval_all,
            "warmup_segments_excluded": warmup,
            "tokens_per_second": timed_tokens / eval_s if eval_s > 0 else None,
            "timer": "cuda_events" if device.type == "cuda" else "perf_counter",
            "peak_memory_bytes": peak,
            "peak_memory_kind": peak_kind,
            "prepare_seconds": built.prepare_seconds,
            "device": device_name(device),
        },
        "prepare": {"seconds": built.prepare_seconds, "cache": built.data.events},
        "checks": None,
        "provenance": provenance(device, cell.seed, cls.requires),
    }


def run_selected(cell: config_mod.Cell, lm, streams: StreamCache, progress: bool = True, observer=None, log=None) -> dict:
    """A `select_on` cell: evaluate every grid setting on the selection split (never the evaluated one),
    then the evaluated split with the setting of lowest NLL; the record says which split chose."""
    sel = cell.method["select_on"]
    tried, first_error = [], None
    for sub in selection_cells(cell):
        params, prep = sub.method["params"], sub.task["prepare_split"]
        try:
            m = run_cell(sub, lm, streams, progress=progress, log=log)["metrics"]
            tried.append({"params": params, "token_ppl": m["token_ppl"], "nll_sum": m["nll_sum"], "n_tokens": m["n_tokens"]})
        except TTABenchError as e:  # e.g. a learning rate that diverges: that setting loses
            first_error = first_error or e
            tried.append({"params": params, "token_ppl": None, "nll_sum": None, "error": str(e)})
    ok = [t for t in tried if t["nll_sum"] is not None]
    if not ok:
        raise TTABenchError(f"every setting failed on the selection split '{sel}': {first_error}")
    best = min(ok, key=lambda t: t["nll_sum"])
    final = dataclasses.replace(cell, method={"name": cell.method["name"], "params": best["params"]})
    record = run_cell(final, lm, streams, progress=progress, observer=observer, log=log)
    record.update(cell_id=cell.cell_id, label=cell.label, config=cell.as_dict())
    record["selection"] = {"split": sel, "prepare_split": prep, "criterion": "lowest token NLL on the selection split",
                           "chosen": best["params"], "candidates": tried}
    return record


def run(path: str, force: bool = False, progress: bool | None = None, log=print, check: bool | None = None) -> Path:
    """Run every cell of the bench file that has no current result; return the run folder. A cell
    that fails is recorded as failed and the others still run; `RunFailed` is raised at the end
    when any did. With check (or the bench's `check: true`) each cell's record also holds the
    validity checks of its setting (SPEC 6). Under torchrun each cell's documents are shared out
    among the processes (sharded.py); with `executor: ray | slurm` the (model, task, seed) groups
    run as remote jobs (executors.py)."""
    from .models import resolve_device
    from .sharded import run_sharded, world_size

    cfg = config_mod.load(path)
    check = cfg.check if check is None else check
    if world_size() > 1:
        return run_sharded(cfg, force, progress, log)
    preflight(cfg)
    device = resolve_device(cfg.device)
    cells = config_mod.expand(cfg, device.type)
    run_dir = cfg.run_dir
    if cfg.executor["name"] == "local":
        worker = Worker(cfg, device, progress, check, log)
        keys = worker.keys(cells)  # everything is checked before anything is computed
    with RunLock(run_dir):
        for tmp in (run_dir / "cells").glob(".*.tmp*"):  # left by a run killed mid-write; never read
            tmp.unlink()
        if cfg.executor["name"] == "local":
            records = worker.run(cells, keys, force)
        else:
            from .executors import run_remote

            records = run_remote(cfg, cells, force, check, log)
        from .leaderboard import write_leaderboard

        for o in write_leaderboard(run_dir, cell_ids={c.cell_id for c in cells}, log=log):
            log(f"wrote {o}")
    failed = [r["label"] for r in records if r["status"] == "failed"]
    if failed:
        raise RunFailed(f"{len(failed)} of {len(cells)} cells failed ({', '.join(failed)}); their records and logs are in"
                        f" {run_dir / 'cells'}; a rerun retries them")
    return run_dir


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
                record = _run_or_fail(cell, lm, self.streams, self.show, self.log, self.check)
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


def _run_or_fail(cell, lm, streams, show, log, check) -> dict:
    """The cell's record; an exception in it gives a failed record and a traceback file, so the
    bench goes on (KeyboardInterrupt still stops the run)."""
    import traceback

    try:
        record = run_cell(cell, lm, streams, progress=show, log=log)
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


def prepare(path: str, progress: bool | None = None, log=print) -> int:
    """`tta-bench prepare`: each cell's preparation (training, datastores, statistics), cached where
    `run` finds it; returns the number of cells prepared. A `select_on` cell prepares every candidate."""
    from .models import resolve_device

    cfg = config_mod.load(path)
    device = resolve_device(cfg.device)
    cells = config_mod.expand(cfg, device.type)
    show = cfg.progress if progress is None else progress
    if device.type == "cpu":
        _retain_freed_memory()  # as in `run`: training allocates the same large buffers every step
    streams, t_all, models = StreamCache(), time.perf_counter(), ModelCache(device, cfg.dtype, log)
    for group in by_model(cells).values():
        lm = models.get(group[0].model)
        for c in group:
            resume_key(c, lm, streams)  # split separation, before anything is trained
    for group in by_model(cells).values():
        lm = models.get(group[0].model)
        jobs = []
        for c in group:  # a selection cell: its candidates, and each setting as the final cell would run it
            jobs += [c] if "grid" not in c.method else selection_cells(c) + [
                dataclasses.replace(c, method={"name": c.method["name"], "params": p}) for p in c.method["grid"]]
        for i, sub in enumerate(jobs, 1):
            log(f"[{i}/{len(jobs)}] prepare {sub.label} on {sub.task['name']}:{sub.task['prepare_split']}")
            built = build_cell(sub, lm, streams, progress=show, load_stream=False)
            built.close()
            log("    " + prepare_summary(built.data.events, built.prepare_seconds))
    log(f"prepared {len(cells)} cells in {time.perf_counter() - t_all:.1f}s; `run` will find their state in the cache")
    return len(cells)
