"""`run`: a bench file into cell records (validate, check, resume, run each cell, write, leaderboard),
here, on a Ray or Slurm cluster (executors.py), or with documents shared out under torchrun
(sharded.py); and `prepare`: every cell's preparation ahead of time, so that a later `run` only
evaluates."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from . import config as config_mod
from .cellrun import prepare_summary, retain_freed_memory
from .cells import StreamCache, build_cell, selection_cells
from .errors import RunFailed, TTABenchError
from .resume import resume_key
from .results import RunLock, cell_path, writable_problem
from .worker import ModelCache, Worker, by_model


def preflight(cfg: config_mod.BenchConfig) -> None:
    problem = writable_problem(cfg.run_dir)
    if problem:
        raise TTABenchError(problem)


def run(path: str, force: bool = False, progress: bool | None = None, log=print, check: bool | None = None,
        log_tokens: bool | None = None) -> Path:
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
    cfg.log_tokens = cfg.log_tokens if log_tokens is None else log_tokens
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

        if records or not _tables_current(run_dir, cells):
            for o in write_leaderboard(run_dir, cell_ids={c.cell_id for c in cells}, log=log):
                log(f"wrote {o}")
        else:
            log(f"{run_dir / 'leaderboard.md'} is up to date: no cell changed")
        if cfg.published:
            from .results import compare_published

            for line in compare_published(run_dir, Path(cfg.published), {c.cell_id for c in cells}):
                log(line)
    failed = [r["label"] for r in records if r["status"] == "failed"]
    if failed:
        raise RunFailed(f"{len(failed)} of {len(cells)} cells failed ({', '.join(failed)}); their records and logs are in"
                        f" {run_dir / 'cells'}; a rerun retries them")
    return run_dir


def _tables_current(run_dir: Path, cells) -> bool:
    """Whether every table file exists and was written after every cell file of this run."""
    tables = [run_dir / f"leaderboard.{ext}" for ext in ("md", "csv", "json", "html")]
    cell_files = [cell_path(run_dir, c.cell_id) for c in cells]
    try:
        return min(t.stat().st_mtime_ns for t in tables) >= max(f.stat().st_mtime_ns for f in cell_files)
    except (OSError, ValueError):
        return False


def prepare(path: str, progress: bool | None = None, log=print) -> int:
    """`tta-bench prepare`: each cell's preparation (training, datastores, statistics), cached where
    `run` finds it; returns the number of cells prepared. A `select_on` cell prepares every candidate."""
    from .models import resolve_device

    cfg = config_mod.load(path)
    device = resolve_device(cfg.device)
    cells = config_mod.expand(cfg, device.type)
    show = cfg.progress if progress is None else progress
    if device.type == "cpu":
        retain_freed_memory()  # as in `run`: training allocates the same large buffers every step
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
