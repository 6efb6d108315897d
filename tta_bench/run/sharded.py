"""One cell's documents across processes started by torchrun (or accelerate launch): gloo on CPU,
nccl on GPU. Only under `reset: document`, where documents are independent.

Rank 0 prepares each cell first (training, datastores and statistics land in the cache), the others
wait at a barrier and then find them there. Document i goes to rank i mod world size. Every rank
evaluates its documents; per-document NLL, the FLOP ledgers and the timings are gathered, and rank 0
writes the one cell: per-document NLL as one process gives it, wall time the slowest rank's.

    torchrun --standalone --nproc_per_node 2 -m tta_bench run bench.yaml
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

from tta_bench.api.errors import TTABenchError
from tta_bench.results.records import CellRecord
from tta_bench.run.options import RunOptions


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _merge(ledgers: list[dict]) -> dict:
    flops, unsupported = Counter(), Counter()
    for led in ledgers:
        flops.update(led["flops"])
        unsupported.update(led["unsupported_ops"])
    return {"flops": dict(flops), "unsupported_ops": dict(sorted(unsupported.items()))}


def run_sharded(cfg, options: RunOptions, log) -> Path:
    """Every cell of the bench, its documents shared out over the torchrun processes; rank 0 writes."""
    import torch
    import torch.distributed as dist

    from tta_bench.run.config import expand
    from tta_bench.protocol.models import resolve_device
    from tta_bench.results.files import RunLock
    from tta_bench.run.worker import Worker, record_summary, write_record

    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    cells = expand(cfg, device.type)
    _refuse_unshardable(cells)
    _init_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    say = log if rank == 0 else (lambda *a: None)
    try:
        worker = Worker(cfg, device, dataclasses.replace(options, progress=False), log=say, write=False)
        keys = worker.keys(cells)
        with RunLock(cfg.run_dir) if rank == 0 else nullcontext():
            if rank == 0:
                from tta_bench.run.overrides import write_resolved

                write_resolved(cfg, options.overrides)
            todo = [worker.todo(cells, keys) if rank == 0 else None]
            dist.broadcast_object_list(todo, src=0)
            for cell in todo[0]:
                say(
                    f"{cell.label} on {cell.task['name']}:{cell.task['split']} seed {cell.seed}, documents over {world} ranks"
                )
                record = _cell(cell, worker, rank, world)
                if rank == 0:
                    record.resume_key = keys[cell.cell_id]
                    record.provenance["overrides"] = list(worker.options.overrides)
                    write_record(cfg.run_dir, record)
                    say(record_summary(record))
            if rank == 0:
                from tta_bench.results.leaderboard import write_leaderboard

                for o in write_leaderboard(cfg.run_dir, cell_ids={c.cell_id for c in cells}, log=say):
                    say(f"wrote {o}")
    finally:
        dist.destroy_process_group()  # frees the group: its backend's destructor joins its threads
    return cfg.run_dir


def _init_group(backend: str) -> None:
    """The default process group, with torch.distributed.nn imported first: that module binds the
    default group of its import into ten default arguments. Imported later (transformers does, by way
    of FSDP, when it loads a model), it would keep the group alive past destroy_process_group, and
    with it the gloo worker threads into interpreter shutdown, where one that releases a finished
    collective's tensors takes the GIL, Python ends the thread (pthread_exit) and its unwinding
    through a noexcept destructor aborts the rank: `terminate called without an active exception`."""
    import torch.distributed as dist
    import torch.distributed.nn  # noqa: F401

    dist.init_process_group(backend)


def _refuse_unshardable(cells) -> None:
    """Documents are shared out only where they are independent, and a selection cell is one run per setting."""
    never = [c.label for c in cells if c.protocol["reset"] == "never"]
    if never:
        raise TTABenchError(
            f"reset: never scores the stream as one sequence carried from document to document ({never[0]}),"
            " so its documents cannot be shared out across processes; run it without torchrun"
        )
    grids = [c.label for c in cells if c.selection is not None]
    if grids:
        raise TTABenchError(f"{grids[0]}: a select_on cell is not sharded; run it without torchrun")


def _cell(cell, worker, rank: int, world: int) -> CellRecord | None:
    """Evaluate this rank's documents of the cell; rank 0 gets the whole cell's record."""
    import torch.distributed as dist

    from tta_bench.run.cells import build_cell
    from tta_bench.protocol.stream import Stream
    from tta_bench.protocol.evaluate import EvalResult
    from tta_bench.run.cellrun import evaluate_cell, make_record, timing
    from tta_bench.protocol.flops import Resolved, charging

    lm = worker.models.get(cell.model)
    if rank == 0:  # prepare once: its state goes to the cache the other ranks then read
        built = build_cell(cell, lm, worker.streams)
    dist.barrier()
    if rank != 0:
        built = build_cell(cell, lm, worker.streams)
    stream = built.stream
    mine = list(range(rank, len(stream.docs), world))
    part = Stream(stream.task, stream.split, [stream.docs[i] for i in mine], stream.fingerprint, stream.cut)
    result = evaluate_cell(built, stream=part) if mine else EvalResult([], [], [], [])
    eval_s, eval_all, timed_tokens, warmup = timing(result)
    if not mine:
        built.close()
    mine_out = {
        "docs": mine,
        "nll": result.doc_nll,
        "eval_seconds": eval_s,
        "eval_seconds_all": eval_all,
        "timed_tokens": timed_tokens,
        "warmup": warmup,
        "ledger": lm.ledger.resolve(),
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, mine_out)
    if rank != 0:
        return None
    with charging(lm, Resolved(_merge([g["ledger"] for g in gathered]))):
        record = make_record(built, _gathered_result(gathered, stream, world))
    record.costs["ranks"] = world
    return record


def _gathered_result(gathered: list[dict], stream, world: int):
    """The whole stream's result from every rank's part: per-document NLL in stream order, the
    slowest rank's time, all ranks' timed tokens and warm-up segments."""
    from tta_bench.protocol.evaluate import EvalResult

    nll = [0.0] * len(stream.docs)
    for g in gathered:
        for i, v in zip(g["docs"], g["nll"]):
            nll[i] = v
    return EvalResult(
        nll,
        [len(d.ids) for d in stream.docs],
        [],
        [],
        extra={
            "ranks": world,
            "eval_seconds": max(g["eval_seconds"] for g in gathered),
            "eval_seconds_all": max(g["eval_seconds_all"] for g in gathered),
            "timed_tokens": sum(g["timed_tokens"] for g in gathered),
            "warmup_segments": sum(g["warmup"] for g in gathered),
        },
    )
