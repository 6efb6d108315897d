"""`run`: a bench file into cell records (validate, check, resume, run each cell, write, leaderboard),
here, on a Ray or Slurm cluster (executors.py), or with documents shared out under torchrun
(sharded.py); and `prepare`: every cell's preparation ahead of time, so that a later `run` only
evaluates."""

from __future__ import annotations

import time
from pathlib import Path

from tta_bench.run import config as config_mod
from tta_bench.run.cellrun import prepare_summary, retain_freed_memory
from tta_bench.run.cells import StreamCache, build_cell, chosen_cell, selection_cells
from tta_bench.api.errors import RunFailed, TTABenchError
from tta_bench.run.options import RunOptions
from tta_bench.run import overrides
from tta_bench.run.resume import resume_key
from tta_bench.results.files import RunLock, writable_problem
from tta_bench.results.records import CellRecord, cell_path
from tta_bench.run.worker import ModelCache, Worker, by_model


def preflight(cfg: config_mod.BenchConfig) -> None:
    problem = writable_problem(cfg.run_dir)
    if problem:
        raise TTABenchError(problem)


def run(
    path: str | None,
    *,
    sets: tuple = (),
    force: bool = False,
    progress: bool | None = None,
    check: bool | None = None,
    log_tokens: bool | None = None,
    log=print,
) -> Path:
    """Run every cell of the bench file that has no current result; return the run folder. A cell
    that fails is recorded as failed and the others still run; `RunFailed` is raised at the end
    when any did. `sets`: the command line's `--set key=value` changes to the bench (overrides.py;
    path None: a bench from them alone), recorded in the run folder and each cell. `force`,
    `progress`, `check` and `log_tokens` are the command line's choices (None: the bench file's;
    see RunOptions). Under torchrun each cell's documents are shared out among the processes
    (sharded.py); with `executor: ray | slurm` the (model, task, seed) groups run as remote jobs
    (executors.py)."""
    from tta_bench.protocol.models import resolve_device
    from tta_bench.run.sharded import run_sharded, world_size

    cfg = overrides.load(path, sets)
    options = RunOptions.resolve(cfg, force, progress, check, log_tokens, sets)
    if world_size() > 1:
        return run_sharded(cfg, options, log)
    preflight(cfg)
    device = resolve_device(cfg.device)
    cells = config_mod.expand(cfg, device.type)
    records = _run_cells(cfg, cells, device, options, log)
    failed = [r.label for r in records if not r.ok]
    if failed:
        raise RunFailed(
            f"{len(failed)} of {len(cells)} cells failed ({', '.join(failed)}); their records and logs are in"
            f" {cfg.run_dir / 'cells'}; a rerun retries them"
        )
    return cfg.run_dir


def _run_cells(cfg: config_mod.BenchConfig, cells, device, options: RunOptions, log) -> list[CellRecord]:
    """The bench as resolved (resolved-bench.yaml), the cells without a current result (here, every
    one checked before any runs; or remotely), then the tables and the reproduction check, all
    under the run folder's lock."""
    run_dir = cfg.run_dir
    if cfg.executor["name"] == "local":
        worker = Worker(cfg, device, options, log)
        keys = worker.keys(cells)  # everything is checked before anything is computed
    with RunLock(run_dir):
        for tmp in (run_dir / "cells").glob(".*.tmp*"):  # left by a run killed mid-write; never read
            tmp.unlink()
        overrides.write_resolved(cfg, options.overrides)  # the bench as this run resolved it, overrides listed
        if cfg.executor["name"] == "local":
            records = worker.run(cells, keys)
        else:
            from tta_bench.run.executors import run_remote

            records = run_remote(cfg, cells, options, log)
        _write_tables(run_dir, cells, records, log)
        if cfg.published:
            from tta_bench.results.records import compare_published

            for line in compare_published(run_dir, Path(cfg.published), {c.cell_id for c in cells}):
                log(line)
    return records


def _write_tables(run_dir: Path, cells, records: list[CellRecord], log) -> None:
    """The leaderboard of the run's cells, unless no cell changed since it was written."""
    from tta_bench.results.leaderboard import write_leaderboard

    if records or not _tables_current(run_dir, cells):
        for o in write_leaderboard(run_dir, cell_ids={c.cell_id for c in cells}, log=log):
            log(f"wrote {o}")
    else:
        log(f"{run_dir / 'leaderboard.md'} is up to date: no cell changed")


def _tables_current(run_dir: Path, cells) -> bool:
    """Whether every table file exists and was written after every cell file of this run."""
    tables = [run_dir / f"leaderboard.{ext}" for ext in ("md", "csv", "json", "html")]
    cell_files = [cell_path(run_dir, c.cell_id) for c in cells]
    try:
        return min(t.stat().st_mtime_ns for t in tables) >= max(f.stat().st_mtime_ns for f in cell_files)
    except (OSError, ValueError):
        return False


def prepare(path: str | None, progress: bool | None = None, log=print, sets: tuple = ()) -> int:
    """`tta-bench prepare`: each cell's preparation (training, datastores, statistics), cached where
    `run` finds it; returns the number of cells prepared. A `select_on` cell prepares every candidate."""
    from tta_bench.protocol.models import resolve_device

    cfg = overrides.load(path, sets)
    device = resolve_device(cfg.device)
    cells = config_mod.expand(cfg, device.type)
    show = RunOptions.resolve(cfg, progress=progress).progress
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
            jobs += [c] if c.selection is None else selection_cells(c) + [chosen_cell(c, p) for p in c.selection.grid]
        for i, sub in enumerate(jobs, 1):
            log(f"[{i}/{len(jobs)}] prepare {sub.label} on {sub.task['name']}:{sub.task['prepare_split']}")
            built = build_cell(sub, lm, streams, progress=show, load_stream=False)
            built.close()
            log("    " + prepare_summary(built.data.events, built.prepare_seconds))
    log(f"prepared {len(cells)} cells in {time.perf_counter() - t_all:.1f}s; `run` will find their state in the cache")
    return len(cells)
