"""Turn a bench file into cell records: preflight, resume, load, prepare, evaluate, cost, write."""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from . import config as config_mod
from .errors import TTABenchError
from .results import SCHEMA, atomic_write, cell_path, device_name, provenance, writable_problem


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
    dynamic-evaluation segment on CPU. Keep them in the heap while a cell runs (process-wide, set
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


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_protocol(cell_protocol: dict, lm):
    from .evaluate import Protocol

    ctx = cell_protocol["context_len"]
    if ctx == "auto":
        ctx = lm.window - cell_protocol["segment_len"]
    if ctx < 1 or ctx + cell_protocol["segment_len"] - 1 > lm.window:
        raise TTABenchError(
            f"context_len {ctx} + segment_len {cell_protocol['segment_len']} - 1 exceeds the window of {lm.name}"
            f" ({lm.window} tokens); lower them")
    return Protocol(cell_protocol["segment_len"], ctx, cell_protocol["reset"])


class StreamCache:
    """Tokenized streams per (model tokenizer, task entry, split, limits)."""

    def __init__(self):
        self.cache = {}

    def get(self, lm, task_entry: dict, split: str, limits: dict):
        from .data import tokenize
        from .registry import get

        key = (lm.fingerprint, json.dumps(task_entry, sort_keys=True), split, json.dumps(limits, sort_keys=True))
        if key not in self.cache:
            task = get("task", task_entry["name"])(**task_entry["params"])
            docs = task.documents(split)
            self.cache[key] = tokenize(docs, lm.tokenizer, task_entry["name"], split,
                                       limits.get("docs"), limits.get("tokens"))
        return self.cache[key]


def run_cell(cell: config_mod.Cell, lm, streams: StreamCache, progress: bool = True, observer=None) -> dict:
    """Evaluate one cell and return its record (not yet written)."""
    import torch

    from .evaluate import evaluate
    from .flops import Ledger
    from .method import PrepareData, method_class
    from .metrics import bootstrap_ci, summarize

    if "grid" in cell.method:
        return run_selected(cell, lm, streams, progress, observer)
    if lm.device.type == "cpu":
        _retain_freed_memory()
    protocol = resolve_protocol(cell.protocol, lm)
    stream = streams.get(lm, cell.task, cell.task["split"], cell.limits)
    if stream.n_tokens == 0:
        raise TTABenchError(f"task {cell.task['name']} {cell.task['split']} has no tokens after limits; raise the limits")
    cls = method_class(cell.method["name"])
    params, errs = cls.make_params(cell.method["params"])
    if errs:
        raise TTABenchError(errs[0])
    seed_everything(cell.seed)
    lm.ledger = Ledger(lm.fingerprint)
    method = cls(lm, params, seed=cell.seed, protocol=protocol)
    prep_split = cell.task["prepare_split"]

    def load_prepare(limit_tokens=None, limit_docs=None):
        if prep_split is None:
            raise TTABenchError(f"method {cls.registry_name} needs a prepare split but task {cell.task['name']} has none besides"
                                f" '{cell.task['split']}'; set `prepare_split` or provide the data")
        if prep_split == cell.task["split"]:
            raise TTABenchError("prepare may not see the evaluated split (SPEC 2)")
        return streams.get(lm, cell.task, prep_split, {"docs": limit_docs, "tokens": limit_tokens})

    device = lm.device
    lm.ledger.enabled = False  # prepare's compute is reported as time, not per-token flops
    t0 = time.perf_counter()
    try:
        method.prepare(PrepareData(prep_split, load_prepare))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        prepare_s = time.perf_counter() - t0
        lm.ledger.enabled = True
        _peak_reset(device)
        result = evaluate(method, stream, protocol, progress=progress, observer=observer)
    finally:
        method.close()  # the loaded model is shared by the next cells
    peak, peak_kind = _peak_read(device)
    costs = lm.ledger.resolve()
    n_tokens = stream.n_tokens
    flops_per_token = {k: v / n_tokens for k, v in costs["flops"].items()}
    timed = result.seconds[1:] if len(result.seconds) > 1 else result.seconds
    timed_tokens = sum(result.seg_tokens[1:]) if len(result.seconds) > 1 else sum(result.seg_tokens)
    eval_s = sum(timed)

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
                     "prepare_split": prep_split, "model_window": lm.window, "model_source": lm.source,
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
            "eval_seconds_all": sum(result.seconds),
            "warmup_segments_excluded": len(result.seconds) - len(timed),
            "tokens_per_second": timed_tokens / eval_s if eval_s > 0 else None,
            "timer": "cuda_events" if device.type == "cuda" else "perf_counter",
            "peak_memory_bytes": peak,
            "peak_memory_kind": peak_kind,
            "prepare_seconds": prepare_s,
            "device": device_name(device),
        },
        "checks": None,
        "provenance": provenance(device, cell.seed),
    }


def run_selected(cell: config_mod.Cell, lm, streams: StreamCache, progress: bool = True, observer=None) -> dict:
    """A `select_on` cell: evaluate every grid setting on the selection split (never the evaluated one),
    then the evaluated split with the setting of lowest NLL; the record says which split chose."""
    import dataclasses

    from .registry import get

    sel, task = cell.method["select_on"], cell.task
    if sel == task["split"]:
        raise TTABenchError(f"choosing a setting on the evaluated split '{sel}' is refused; set select_on to another split")
    # prepare, while selecting, may see neither the selection split nor the evaluated one
    splits = [task["prepare_split"], *get("task", task["name"])(**task["params"]).available_splits()]
    prep = next((s for s in splits if s and s not in (sel, task["split"])), None)
    tried, first_error = [], None
    for params in cell.method["grid"]:
        sub = dataclasses.replace(cell, task={**task, "split": sel, "prepare_split": prep},
                                  method={"name": cell.method["name"], "params": params})
        try:
            m = run_cell(sub, lm, streams, progress=progress)["metrics"]
            tried.append({"params": params, "token_ppl": m["token_ppl"], "nll_sum": m["nll_sum"], "n_tokens": m["n_tokens"]})
        except TTABenchError as e:  # e.g. a learning rate that diverges: that setting loses
            first_error = first_error or e
            tried.append({"params": params, "token_ppl": None, "nll_sum": None, "error": str(e)})
    ok = [t for t in tried if t["nll_sum"] is not None]
    if not ok:
        raise TTABenchError(f"every setting failed on the selection split '{sel}': {first_error}")
    best = min(ok, key=lambda t: t["nll_sum"])
    final = dataclasses.replace(cell, method={"name": cell.method["name"], "params": best["params"]})
    record = run_cell(final, lm, streams, progress=progress, observer=observer)
    record.update(cell_id=cell.cell_id, label=cell.label, config=cell.as_dict())
    record["selection"] = {"split": sel, "prepare_split": prep, "criterion": "lowest token NLL on the selection split",
                           "chosen": best["params"], "candidates": tried}
    return record


def run(path: str, force: bool = False, progress: bool | None = None, log=print, check: bool | None = None) -> Path:
    """Run every cell of the bench file not yet finished; return the run folder. With check (or the
    bench's `check: true`) each cell's record also holds the validity checks of its setting (SPEC 6)."""
    cfg = config_mod.load(path)
    check = cfg.check if check is None else check
    preflight(cfg)
    from .models import load_model, resolve_device

    device = resolve_device(cfg.device)
    cells = config_mod.expand(cfg, device.type)
    run_dir = cfg.run_dir
    todo = [c for c in cells if force or not cell_path(run_dir, c.cell_id).exists()]
    log(f"{len(cells)} cells in {run_dir}: {len(cells) - len(todo)} done, {len(todo)} to run")
    show = cfg.progress if progress is None else progress
    streams = StreamCache()
    by_model: dict[str, list] = {}
    for c in todo:
        by_model.setdefault(json.dumps(c.model, sort_keys=True), []).append(c)
    for model_key, group in by_model.items():
        spec = json.loads(model_key)
        t0 = time.perf_counter()
        extra = {k: v for k, v in spec.items() if k in ("revision", "source")}
        lm = load_model(spec["name"], device=str(device), dtype=cfg.dtype, **extra)
        log(f"loaded {spec['name']} ({lm.source}) on {device} in {time.perf_counter() - t0:.1f}s")
        for i, cell in enumerate(group, 1):
            log(f"[{i}/{len(group)}] {cell.label} on {cell.task['name']}:{cell.task['split']} seed {cell.seed}")
            record = run_cell(cell, lm, streams, progress=show)
            if check:
                from .checks import check_cell, failures

                record["checks"] = check_cell(cell, record, lm)
                log("    checks: " + ("all pass" if record["checks"]["passed"] else "FAILED: " + "; ".join(failures(record["checks"]))))
            atomic_write(cell_path(run_dir, cell.cell_id), json.dumps(record, indent=1, sort_keys=False))
            m, c = record["metrics"], record["costs"]
            log(f"    token ppl {m['token_ppl']:.3f}  bits/byte {m['bits_per_byte']:.4f}  "
                f"{c['gflops_per_token']:.3f} GFLOPs/token  {c['tokens_per_second'] or 0:.0f} tok/s")
    from .leaderboard import write_leaderboard

    outputs = write_leaderboard(run_dir)
    for o in outputs:
        log(f"wrote {o}")
    return run_dir
