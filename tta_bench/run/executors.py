"""Cells beyond this process (SPEC 8): `executor: ray` or `executor: slurm` in a bench file.

The unit of work is a (model, task, seed) group, `none` first, so that every time ratio to `none`
is measured in one process on one device. Each group runs `work_group` remotely: it checks its cells
(split separation, resume keys), skips those with a current result (in the shared results folder,
or in the driver's copy it was sent), runs the rest, and writes its cell files when the folder is
shared (`shared_fs: true`), else returns the records for the driver to write. The driver holds the
run-folder lock throughout and writes the leaderboard. A Slurm job that is preempted is requeued
by submitit and resumes where its cell files end.
"""

from __future__ import annotations

import dataclasses
import json

from tta_bench.api.errors import TTABenchError
from tta_bench.results.records import CellRecord
from tta_bench.run.options import RunOptions


def groups(cells) -> list[list]:
    """Cells by (model, task, seed), in order (`none` first within each, as config.expand sorts them)."""
    out: dict[str, list] = {}
    for c in cells:
        out.setdefault(json.dumps([c.model, c.task, c.seed], sort_keys=True), []).append(c)
    return list(out.values())


def work_group(
    raw: dict, path: str, cell_ids: list[str], options: RunOptions, done: dict, write: bool
) -> list[CellRecord]:
    """One group, on a worker: the bench is validated again there (plugins included)."""
    import torch

    from tta_bench.run.config import expand, validate
    from tta_bench.protocol.models import resolve_device
    from tta_bench.run.worker import Worker

    cfg, problems = validate(raw, path)
    if problems:
        raise TTABenchError(f"{path}: {problems[0]}")
    torch.set_num_threads(cfg.executor["cpus"])  # the group's share of the machine, wherever it lands
    device = resolve_device(cfg.device)
    wanted = set(cell_ids)
    cells = [c for c in expand(cfg, device.type) if c.cell_id in wanted]
    worker = Worker(cfg, device, options, write=write)
    return worker.run(cells, worker.keys(cells), done)


class GroupJob:
    """A submitit job: on preemption or timeout it is requeued with the same arguments, and the
    rerun skips the cells whose files it finds."""

    def __call__(self, *args):
        return work_group(*args)

    def checkpoint(self, *args):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args)


def _finished(run_dir) -> dict:
    """cell id -> resume key of the driver's finished cells (sent to workers that cannot see them)."""
    from tta_bench.results.records import load_cells

    return {r.cell_id: r.resume_key for r in load_cells(run_dir) if r.ok}


def run_remote(cfg, cells, options: RunOptions, log=print) -> list[CellRecord]:
    """Every group as a remote job; returns the records of the cells that ran (written, either by
    the workers or here)."""
    from pathlib import Path

    from tta_bench.run.worker import write_record

    ex = cfg.executor
    done = {} if options.force else _finished(cfg.run_dir)
    remote = dataclasses.replace(options, progress=False)  # a worker's output is a log file: no progress bars
    jobs = [
        (cfg.raw, str(Path(cfg.path).resolve()), [c.cell_id for c in g], remote, done, ex["shared_fs"])
        for g in groups(cells)
    ]
    log(f"{len(cells)} cells in {len(jobs)} groups, on {ex['name']}")
    runner = _run_ray if ex["name"] == "ray" else _run_slurm
    records = [r for batch in runner(ex, jobs, cfg.run_dir, log) for r in batch]
    for r in records:
        if not ex["shared_fs"]:
            write_record(cfg.run_dir, r)
        log(f"{r.label} ({r.config['task']['name']}, seed {r.seed}):" + _summary(r))
    return records


def _summary(record) -> str:
    from tta_bench.run.worker import record_summary

    return record_summary(record).replace("    ", " ", 1)


def _run_ray(ex, jobs, run_dir, log) -> list[list[CellRecord]]:
    try:
        import ray
    except ImportError:
        raise TTABenchError('executor ray needs Ray: pip install ".[ray]"') from None
    started = not ray.is_initialized()
    if started:
        kw = (
            {"address": ex["address"]}
            if ex["address"]
            else {"num_cpus": ex["cpus"] * len(jobs), "include_dashboard": False}
        )
        ray.init(log_to_driver=True, **kw)
    try:
        task = ray.remote(num_cpus=ex["cpus"], num_gpus=ex["gpus"], max_retries=ex["retries"])(work_group)
        refs = [task.remote(*job) for job in jobs]
        out, pending = [], list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            out.append(ray.get(ready[0]))
            log(f"  group {len(out)}/{len(refs)} finished")
        return out
    finally:
        if started:
            ray.shutdown()


def _run_slurm(ex, jobs, run_dir, log) -> list[list[CellRecord]]:
    try:
        import submitit
    except ImportError:
        raise TTABenchError('executor slurm needs submitit: pip install ".[slurm]"') from None
    from pathlib import Path

    folder = Path(ex["folder"]) if Path(ex["folder"]).is_absolute() else Path(run_dir) / ex["folder"]
    executor = submitit.AutoExecutor(folder=str(folder), cluster=None if ex["cluster"] == "slurm" else ex["cluster"])
    params = {
        "timeout_min": ex["time_min"],
        "cpus_per_task": ex["cpus"],
        "mem_gb": ex["mem_gb"],
        "slurm_array_parallelism": ex["array_parallelism"],
    }
    if ex["gpus"]:
        params["gpus_per_node"] = ex["gpus"]
    if ex["partition"]:
        params["slurm_partition"] = ex["partition"]
    executor.update_parameters(
        **{k: v for k, v in params.items() if ex["cluster"] == "slurm" or not k.startswith("slurm_")}
    )
    job = GroupJob()
    submitted = (
        executor.map_array(job, *zip(*jobs)) if ex["cluster"] == "slurm" else [executor.submit(job, *j) for j in jobs]
    )
    log(f"  submitted {len(submitted)} jobs ({submitted[0].job_id.split('_')[0]}...); logs in {folder}")
    return [j.result() for j in submitted]
