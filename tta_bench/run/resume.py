"""Resume keys (SPEC 7): a finished cell is reused only while everything that determines its result
is unchanged: its config, the model's weights, the data it reads, the files its setting reads, and
the code of the harness, the method and the task. Anything else is recomputed, and the run says why."""

from __future__ import annotations

from pathlib import Path

from tta_bench.run.cells import StreamCache, resolve_protocol, selection_cells
from tta_bench.api.errors import TTABenchError


def resume_key(cell, lm, streams: StreamCache) -> dict:
    """What determines a cell's result besides its config: the model's weights, the data it reads
    (the evaluated stream, the prepare split, a selection split) and the code of the harness, the
    method and the task. Computing it checks split separation first (SPEC 2): nothing prepare
    receives may share a document or a run of tokens with an evaluated stream."""
    from tta_bench.api.method import method_class
    from tta_bench.api.registry import code_fingerprint, harness_fingerprint
    from tta_bench.checks.separation import check_streams

    resolve_protocol(cell.protocol, lm)  # the window fits
    cls = method_class(cell.method["name"])
    pairs = [(cell.task, cell.task["split"], cell.limits)]
    if cell.selection is not None:
        sel = selection_cells(cell)[0]
        pairs.append((sel.task, sel.task["split"], cell.limits))
    data, given, files = {}, [], set()
    for params in cell.selection.grid if cell.selection is not None else [cell.method["params"]]:
        typed, errs = cls.make_params({**cell.method["params"], **params})
        if errs:
            raise TTABenchError(errs[0])
        given += cls.given_data(typed)
        files.update(cls.given_files(typed))
    for task, split, limits in pairs:
        evaluated = streams.get(lm, task, split, limits)
        prep = task["prepare_split"]
        prepared = streams.get(lm, task, prep, {}) if prep and prep != split else None
        check_streams(evaluated, prepared, given)
        data[split] = evaluated.fingerprint
        if prepared is not None:
            data[prep] = prepared.fingerprint
    return {
        "config": cell.cell_id,
        "model": lm.fingerprint,
        "data": data,
        "files": {f: _file_hash(f) for f in sorted(files)},
        "code": {
            "harness": harness_fingerprint(),
            "method": code_fingerprint("method", cell.method["name"]),
            "task": code_fingerprint("task", cell.task["name"]),
        },
    }


def _file_hash(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def stale_reason(path: Path, key: dict) -> str | None:
    """None when the cell file holds a finished result for exactly this key; else why it must be computed."""
    from tta_bench.results.records import read_cell

    if not path.exists():
        return "new"
    rec, why = read_cell(path)
    if rec is None:
        return f"its cell file is {why}"
    if not rec.ok:
        return f"it failed before ({'?' if rec.reason is None else rec.reason})"
    old = rec.resume_key
    changed = [what for what in ("config", "model", "data", "files", "code") if old.get(what) != key.get(what)]
    if changed:
        detail = {
            "model": "the model's weights",
            "data": "the data",
            "files": "a file the setting reads",
            "config": "the config",
            "code": "the code of "
            + " and ".join(k for k in ("harness", "method", "task") if old.get("code", {}).get(k) != key["code"][k]),
        }
        return "stale: " + ", ".join(detail[w] for w in changed) + " changed since it was computed"
    return None
