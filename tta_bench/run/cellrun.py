"""One cell, start to finish: build it (cells.build_cell), evaluate it with peak memory counted from
the start of evaluation, and turn the result into its record (SPEC 7); a `select_on` cell chooses
its setting on the selection split first."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tta_bench.run.cells import StreamCache, build_cell, chosen_cell, selection_cells
from tta_bench.run.config import Cell
from tta_bench.protocol.flops import PADDING
from tta_bench.api.errors import TTABenchError
from tta_bench.results.records import CellRecord
from tta_bench.results.provenance import provenance


def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)  # memory kept by retain_freed_memory goes back first
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


def retain_freed_memory() -> None:
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


def run_cell(cell: Cell, lm, streams: StreamCache, progress: bool = True, observer=None, log=None) -> CellRecord:
    """Evaluate one cell and return its record (not yet written)."""
    if cell.selection is not None:
        return run_selected(cell, lm, streams, progress, observer, log)
    if lm.device.type == "cpu":
        retain_freed_memory()
    built = build_cell(cell, lm, streams, progress=progress)
    if log:
        log("    prepare: " + prepare_summary(built.data.events, built.prepare_seconds))
    return make_record(built, evaluate_cell(built, progress, observer))


def evaluate_cell(built, progress: bool = False, observer=None, stream=None):
    """Evaluate a built cell as `run` does (freed memory kept in the heap, peak memory counted from
    here), then close it: the loaded model is shared by the next cells."""
    if built.lm.device.type == "cpu":
        retain_freed_memory()
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


def timing(result) -> tuple[float, float, int, int]:
    """(timed seconds, all seconds, timed tokens, warm-up segments left out): the first segment warms
    up and is not timed, unless it is the only one."""
    warmup = 1 if len(result.seconds) > 1 else 0
    return (sum(result.seconds[warmup:]), sum(result.seconds), sum(result.seg_tokens[warmup:]), warmup)


def make_record(built, result) -> CellRecord:
    """The cell record (SPEC 7) of an evaluated cell."""
    from tta_bench.api.method import method_class

    cell, stream, params = built.cell, built.stream, built.params
    cls = method_class(cell.method["name"])
    costs = _costs(built, result)  # first: the peak memory is the evaluation's, before the bootstrap allocates
    metrics = _metrics(stream, result)
    origin = provenance(built.lm.device, cell.seed, cls.requires)
    return CellRecord(
        cell_id=cell.cell_id,
        label=cell.label,
        config=cell.as_dict(),
        resolved=_resolved(built, cls),
        stream={
            "task": stream.task,
            "split": stream.split,
            "fingerprint": stream.fingerprint,
            "n_docs": len(stream.docs),
            "n_tokens": stream.n_tokens,
            **({"draw": stream.draw} if stream.draw is not None else {}),
        },
        metrics=metrics,
        per_doc=[
            {"title": d.title, "nll": n, "tokens": t, "bytes": d.n_bytes, "words": d.n_words}
            for d, n, t in zip(stream.docs, result.doc_nll, result.doc_tokens)
        ],
        costs={**costs, "device": origin["device"]},
        role={"test_time": cls.adapts_at_test_time(params), "control": cls.control(params)},
        prepare={"seconds": built.prepare_seconds, "cache": built.data.events},
        provenance=origin,
    )


def _resolved(built, cls) -> dict:
    """What the cell resolved to on its model: the protocol, the prepare split, the model, every method param."""
    protocol, lm = built.protocol, built.lm
    return {
        "segment_len": protocol.segment_len,
        "context_len": protocol.context_len,
        "reset": protocol.reset,
        "prepare_split": built.cell.task["prepare_split"],
        "model_window": lm.window,
        "model_source": lm.source,
        "model_fingerprint": lm.fingerprint,
        "model_dtype": str(lm.dtype).removeprefix("torch."),  # what a model's `dtype: auto` resolved to
        "method_params": {k: getattr(built.params, k) for k in cls.param_fields()},
    }


def _metrics(stream, result) -> dict:
    """The stream's totals (summarize) with their CIs over documents."""
    from tta_bench.protocol.metrics import document_ci, summarize

    d_bytes, d_words = [d.n_bytes for d in stream.docs], [d.n_words for d in stream.docs]
    metrics = summarize(sum(result.doc_nll), stream.n_tokens, sum(d_bytes), sum(d_words))
    metrics["ci95"] = document_ci(result.doc_nll, result.doc_tokens, d_bytes, d_words)
    return metrics


def _costs(built, result) -> dict:
    """What the cell cost (SPEC 5) but the device line: flops, timed seconds, peak memory, prepare."""
    lm, events = built.lm, built.data.events
    peak, peak_kind = _peak_read(lm.device)
    ledger = lm.ledger.resolve()
    flops_per_token = {k: v / built.stream.n_tokens for k, v in ledger["flops"].items()}
    eval_s, eval_all, timed_tokens, warmup = _timed(result)
    lanes = (
        {k: result.extra[k] for k in ("lanes", "lanes_note") if k in result.extra} if built.protocol.lanes > 1 else {}
    )
    return {
        "flops": ledger["flops"],
        "flops_per_token": flops_per_token,
        # padding (lanes of unequal inputs) is counted apart, under forward.padding.*, and left out here
        "gflops_per_token": sum(v for k, v in flops_per_token.items() if not k.startswith(PADDING)) / 1e9,
        **lanes,
        "unsupported_ops": ledger["unsupported_ops"],
        "flop_convention": "fvcore: one multiply-add = one flop; backward/update via FlopCounterMode halved",
        "eval_seconds": eval_s,
        "eval_seconds_all": eval_all,
        "warmup_segments_excluded": warmup,
        "tokens_per_second": timed_tokens / eval_s if eval_s > 0 else None,
        "timer": "cuda_events" if lm.device.type == "cuda" else "perf_counter",
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "prepare_seconds": built.prepare_seconds,
        # what building the cell's prepared state cost, cached or not (SPEC 5): time and flops, in total
        "prepare_build_seconds": built.prepare_seconds + sum(e.get("build_seconds") or 0.0 for e in events if e["hit"]),
        "prepare_flops": sum(e.get("flops") or 0.0 for e in events),
    }


def _timed(result) -> tuple[float, float, int, int]:
    """timing(result), or with documents shared out by torchrun, the slowest rank's time and all ranks' tokens."""
    if "ranks" in result.extra:
        return tuple(result.extra[k] for k in ("eval_seconds", "eval_seconds_all", "timed_tokens", "warmup_segments"))
    return timing(result)


def run_selected(cell: Cell, lm, streams: StreamCache, progress: bool = True, observer=None, log=None) -> CellRecord:
    """A `select_on` cell: evaluate every grid setting on the selection split (never the evaluated one),
    then the evaluated split with the setting of lowest NLL; the record says which split chose."""
    candidates = selection_cells(cell)
    tried, first_error = _try_settings(candidates, lm, streams, progress, log)
    ok = [t for t in tried if t["nll_sum"] is not None]
    if not ok:
        raise TTABenchError(f"every setting failed on the selection split '{cell.selection.split}': {first_error}")
    best = min(ok, key=lambda t: t["nll_sum"])
    record = run_cell(chosen_cell(cell, best["params"]), lm, streams, progress=progress, observer=observer, log=log)
    selection = {
        "split": cell.selection.split,
        "prepare_split": candidates[-1].task["prepare_split"],
        "criterion": "lowest token NLL on the selection split",
        "chosen": best["params"],
        "candidates": tried,
    }
    return dataclasses.replace(
        record, cell_id=cell.cell_id, label=cell.label, config=cell.as_dict(), selection=selection
    )


def _try_settings(
    candidates: list[Cell], lm, streams: StreamCache, progress: bool, log
) -> tuple[list[dict], Exception | None]:
    """Each candidate's NLL on the selection split (None where it failed), and the first failure."""
    tried, first_error = [], None
    for sub in candidates:
        key = _candidate_key(sub, lm, streams)
        if key not in streams.tried:
            streams.tried[key] = _try_setting(sub, lm, streams, progress, log)
        entry, error = streams.tried[key]
        tried.append(entry)
        first_error = first_error or error
    return tried, first_error


def _try_setting(sub: Cell, lm, streams: StreamCache, progress: bool, log) -> tuple[dict, Exception | None]:
    params = sub.method["params"]
    try:
        m = run_cell(sub, lm, streams, progress=progress, log=log).metrics
    except TTABenchError as e:  # e.g. a learning rate that diverges: that setting loses
        return {"params": params, "token_ppl": None, "nll_sum": None, "error": str(e)}, e
    return {"params": params, "token_ppl": m["token_ppl"], "nll_sum": m["nll_sum"], "n_tokens": m["n_tokens"]}, None


def _candidate_key(sub: Cell, lm, streams: StreamCache) -> tuple:
    """A candidate by what decides its result: its setting, and the text of its two splits (not their task's name)."""
    task = sub.task
    setting = {k: v for k, v in sub.as_dict().items() if k != "task"}
    return (
        json.dumps(setting, sort_keys=True),
        streams.content_key(lm, task, task["split"], sub.limits),
        task["prepare_split"] and streams.content_key(lm, task, task["prepare_split"], {}),
    )
