"""Leaderboards from cell records (SPEC 7): one table per (task, model, protocol, limits, device),
rows sorted by perplexity, as Markdown, CSV, JSON, a sortable HTML page, and plots of the paired
ΔNLL/token against FLOPs and time (plots.py). Several results folders merge, unless their provenance conflicts."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from tta_bench.api.errors import TTABenchError
from tta_bench.results.plots import plot
from tta_bench.results.render import markdown, html_page, slug
from tta_bench.results.files import atomic_write
from tta_bench.results.records import CellRecord, load_cells

README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def table_key(rec: CellRecord) -> tuple:
    cfg = rec.config
    res = rec.resolved or cfg["protocol"]  # a cell that failed early has only its config
    limits = ", ".join(f"{k} {v}" for k, v in sorted(cfg["limits"].items()) if v) or "no limits"
    task = cfg["task"].get("label") or f"{cfg['task']['name']}:{cfg['task']['split']}"
    return (
        task,
        cfg["model"]["name"],
        f"segment {res['segment_len']}, context {res['context_len']}, reset {res['reset']}",
        limits,
        rec.device,
    )


def _provenance(rec: CellRecord) -> dict:
    return {
        "harness version": rec.provenance["versions"].get("tta-bench"),
        "data hash": rec.stream["fingerprint"],
        "model hash": rec.resolved["model_fingerprint"],
    }


def _current_code() -> dict:
    """Per cell, whether the code that computed it is this checkout's (harness, method, task); None
    where that cannot be told (a method that is no longer registered)."""
    from tta_bench.api.registry import code_fingerprint, harness_fingerprint

    harness, cache = harness_fingerprint(), {}

    def current(rec: CellRecord) -> bool | None:
        code, method, task = rec.resume_key.get("code", {}), rec.method_name, rec.config["task"]["name"]
        try:
            for kind, name in (("method", method), ("task", task)):
                if (kind, name) not in cache:
                    cache[kind, name] = code_fingerprint(kind, name)
        except TTABenchError:
            return None
        return (
            code.get("harness") == harness
            and code.get("method") == cache["method", method]
            and code.get("task") == cache["task", task]
        )

    return current


def load_records(
    dirs: list[Path], allow_mixed: bool = False, cell_ids: set | None = None, notes: list | None = None
) -> tuple[list[CellRecord], list[CellRecord]]:
    """(finished cells, failed cells) of every folder (only `cell_ids` when given); one copy of a
    cell computed twice. Refuses a table that mixes conflicting provenance, or cells computed by
    this checkout's code with cells computed by other code (stale ones)."""
    notes = [] if notes is None else notes
    seen, records = set(), []
    for d in dirs:
        if not (Path(d) / "cells").is_dir():
            raise TTABenchError(f"{d} has no cells/ folder; give a results folder written by `tta-bench run`")
        for rec in load_cells(Path(d), notes):
            if rec.cell_id not in seen and (cell_ids is None or rec.cell_id in cell_ids):
                seen.add(rec.cell_id)
                records.append(rec)
    failed = [r for r in records if not r.ok]
    records = [r for r in records if r.ok]
    if not records and not failed:
        raise TTABenchError(f"no cell records under {', '.join(map(str, dirs))}; run a bench first")
    if not allow_mixed:
        _refuse_mixed(records, notes)
    return records, failed


def _refuse_mixed(records: list[CellRecord], notes: list) -> None:
    """Raise where the cells of one table disagree on provenance or on the code that computed them;
    note a table computed entirely by other code."""
    by_key: dict[tuple, dict[str, set]] = {}
    current = _current_code()
    for rec in records:
        found = by_key.setdefault(table_key(rec), {})
        for what, value in _provenance(rec).items():
            found.setdefault(what, set()).add(value)
        found.setdefault("code", set()).add({True: "this checkout's", False: "other (stale)", None: None}[current(rec)])
    for key, found in by_key.items():
        found["code"].discard(None)
        for what, values in found.items():
            if len(values) > 1:
                raise TTABenchError(
                    f"cells for {key[0]} · {key[1]} disagree on {what} ({', '.join(sorted(map(str, values)))});"
                    " rerun `tta-bench run` to recompute stale cells, merge only comparable results,"
                    " or pass --allow-mixed"
                )
        if found["code"] == {"other (stale)"}:
            notes.append(f"{key[0]} · {key[1]}: every cell was computed by code other than this checkout's")


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _docs(recs: list[CellRecord]) -> dict:
    """One setting's per-document arrays: nll averaged over its seeds (SPEC 4: before pairing), each
    seed's nll, and the counts (the same for every seed: the same documents)."""
    per_seed = np.array([r.doc_nll for r in recs], dtype=np.float64)
    first = recs[0].per_doc
    return {
        "nll": per_seed.mean(axis=0),
        "per_seed": per_seed,
        # a count a record lacks is 0: its metric is then n/a, never a wrong number
        **{k: np.array([d.get(k, 0) for d in first], dtype=np.float64) for k in ("tokens", "bytes", "words")},
    }


def control_label(rec: CellRecord, by_label: dict[str, list[CellRecord]]) -> str | None:
    """The label of the setting that is `rec`'s control (SPEC 3): `none` when the method names none,
    else a cell of the named method whose resolved params include the named ones; None if absent."""
    role = rec.role or {}
    if not role.get("test_time"):
        return None
    want = role.get("control")
    if not want:
        return "none" if "none" in by_label else None
    for label, recs in sorted(by_label.items()):
        have = recs[0].resolved["method_params"]
        if recs[0].method_name == want["method"] and all(have.get(k) == v for k, v in want["params"].items()):
            return label
    return None


def rows(records: list[CellRecord], failed: list[CellRecord] = ()) -> dict[tuple, list[dict]]:
    """Table rows per key; the seeds of one method setting give mean and std; every row is set against
    `none` and against its control with paired intervals over documents (metrics.paired_difference),
    the declared contrasts marked after Holm's correction."""
    groups: dict[tuple, dict[str, list[CellRecord]]] = {}
    for rec in records:
        groups.setdefault(table_key(rec), {}).setdefault(rec.label, []).append(rec)
    tables = {key: _table(by_label) for key, by_label in groups.items()}
    for rec in failed:  # listed under the table they belong to, never averaged into it
        tables.setdefault(table_key(rec), []).append(
            {"method": rec.label, "status": "failed", "reason": rec.reason, "log": f"cells/{rec.log}"}
        )
    return tables


def _stats(recs: list[CellRecord], docs: dict) -> dict:
    """One setting's numbers, as means over its seeds (and the std of token perplexity); the 95% CI
    is over documents, on the per-document NLL averaged over the seeds."""
    from tta_bench.protocol.metrics import document_ci

    ppl = [r.metrics["token_ppl"] for r in recs if r.metrics["token_ppl"] is not None]
    costs = [r.costs for r in recs]
    ci = document_ci(docs["nll"], docs["tokens"], docs["bytes"], docs["words"])["token_ppl"] or [None, None]
    return {
        "token_ppl": _mean(ppl),
        "token_ppl_std": float(np.std(ppl, ddof=1)) if len(ppl) > 1 and all(map(math.isfinite, ppl)) else None,
        "ci95_low": ci[0],
        "ci95_high": ci[1],
        "word_ppl": _mean(r.metrics["word_ppl"] for r in recs),
        "bits_per_byte": _mean(r.metrics["bits_per_byte"] for r in recs),
        "gflops_per_token": _mean(c["gflops_per_token"] for c in costs),
        "tokens_per_s": _mean(c["tokens_per_second"] for c in costs),
        "sec_per_token": _mean(1 / c["tokens_per_second"] for c in costs if c["tokens_per_second"]),
        "peak_mem_mb": _mean(c["peak_memory_bytes"] / 2**20 for c in costs),
        "prepare_s": _mean(c.get("prepare_build_seconds", c["prepare_seconds"]) for c in costs),
        "prepare_tflops": _mean(c["prepare_flops"] / 1e12 for c in costs if "prepare_flops" in c),
        "seeds": len(recs),
    }


def versus(mine: dict, ref: dict) -> dict | None:
    """The paired difference of one setting to another (metrics.paired_difference) on the per-document
    NLL averaged over seeds, with `seed_std`: the std over this setting's seeds of each seed's
    ΔNLL/token against the reference (None with one seed)."""
    from tta_bench.protocol.metrics import paired_difference

    if len(mine["nll"]) != len(ref["nll"]):
        return None
    d = paired_difference(mine["nll"], ref["nll"], mine["tokens"], mine["bytes"])
    if d is not None:
        per_seed = (mine["per_seed"] - ref["nll"]).sum(axis=1) / mine["tokens"].sum()
        d["seed_std"] = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None
        d.update(p_holm=None, significant=False, declared=False)
    return d


def _mark_holm(out: list[dict], alpha: float = 0.05) -> None:
    """Holm's correction over the contrasts the table declares (each TTA row against `none` and
    against its control; one contrast where the control is `none`); a mark needs an adjusted p below
    alpha and an interval of nonzero width (a zero-width one has no p-value)."""
    family = []
    for r in out:
        for d in (r["vs_none"], r["vs_control"]) if r["kind"] == "TTA" else ():
            if d is not None and all(d is not f for f in family):  # one contrast where the control is none
                family.append(d)
    from tta_bench.protocol.metrics import holm

    for d, p in zip(family, holm([d["p"] for d in family])):
        d.update(declared=True, p_holm=p, significant=p is not None and p < alpha and not d["zero_width"])


def _table(by_label: dict[str, list[CellRecord]]) -> list[dict]:
    """One table's rows (one per setting), sorted by perplexity."""
    docs = {label: _docs(recs) for label, recs in by_label.items()}
    stats = {label: _stats(recs, docs[label]) for label, recs in by_label.items()}
    base = stats.get("none")

    def ratio(s, k):
        return s[k] / base[k] if base and s[k] is not None and base[k] else None

    out = []
    for label, recs in by_label.items():
        s, role, control = stats[label], recs[0].role or {}, control_label(recs[0], by_label)
        vs_none = versus(docs[label], docs["none"]) if label != "none" and "none" in docs else None
        s.update(
            method=label,
            kind="base" if recs[0].method_name == "none" else "TTA" if role.get("test_time", True) else "control",
            vs_none=vs_none,
            control=control,
            vs_control=vs_none if control == "none" else versus(docs[label], docs[control]) if control else None,
            flops_x_none=ratio(s, "gflops_per_token"),
            time_x_none=ratio(s, "sec_per_token"),
        )
        out.append(s)
    _mark_holm(out)
    return sorted(out, key=lambda r: math.inf if r["token_ppl"] is None else r["token_ppl"])


def write_leaderboard(
    dirs,
    out: Path | None = None,
    allow_mixed: bool = False,
    readme: Path | None = None,
    cell_ids: set | None = None,
    log=None,
) -> list[Path]:
    """Write leaderboard.{md,csv,json,html} and a plot per table into `out` (default: the first
    folder); `cell_ids`: only these cells (a run's own); `log`: where notes go (skipped files)."""
    import pandas as pd

    dirs = [Path(d) for d in (dirs if isinstance(dirs, (list, tuple)) else [dirs])]
    out = Path(out) if out else dirs[0]
    notes: list[str] = []
    tables = rows(*load_records(dirs, allow_mixed, cell_ids, notes))
    for n in notes:
        (log or print)(f"note: {n}")
    out.mkdir(parents=True, exist_ok=True)
    written, plots = [], {}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        matplotlib = None
    if matplotlib is not None:
        for key, table in tables.items():
            paths = plot(key, table, out / f"plot-{slug(key)}")
            if paths:
                plots[key] = paths[0].name
                written += paths
    md = out / "leaderboard.md"
    atomic_write(md, "# tta-bench leaderboard\n\n" + markdown(tables, plots=plots))
    flat = [
        {"task": k[0], "model": k[1], "protocol": k[2], "limits": k[3], "device": k[4], "status": "ok", **_flat(r)}
        for k, table in sorted(tables.items())
        for r in table
    ]
    frame = pd.DataFrame(flat)
    atomic_write(out / "leaderboard.csv", frame.to_csv(index=False))
    atomic_write(out / "leaderboard.json", json.dumps(json.loads(frame.to_json(orient="records")), indent=1))
    atomic_write(out / "leaderboard.html", html_page(tables, plots))
    written += [md, out / "leaderboard.csv", out / "leaderboard.json", out / "leaderboard.html"]
    if readme is not None:
        readme = Path(readme)
        update_readme(
            readme, tables, {k: os.path.relpath(out / v, readme.resolve().parent) for k, v in plots.items()}, out
        )
        written.append(Path(readme))
    return written


DELTA_COLUMNS = {  # CSV/JSON column stem: (key in a paired difference, index into it or None)
    "dnll": ("delta_nll", None),
    "dnll_ci95_low": ("nll_ci95", 0),
    "dnll_ci95_high": ("nll_ci95", 1),
    "dnll_seed_std": ("seed_std", None),
    "p": ("p", None),
    "p_holm": ("p_holm", None),
    "significant": ("significant", None),
    "dbpb": ("delta_bpb", None),
    "dbpb_ci95_low": ("bpb_ci95", 0),
    "dbpb_ci95_high": ("bpb_ci95", 1),
    "delta_ppl": ("delta_ppl", None),
    "delta_ppl_ci95_low": ("ci95", 0),
    "delta_ppl_ci95_high": ("ci95", 1),
}


def _flat(row: dict) -> dict:
    """A row for CSV and JSON: each paired difference as its own columns."""
    out = {k: v for k, v in row.items() if k not in ("vs_none", "vs_control")}
    for k in ("vs_none", "vs_control"):
        d = row.get(k) or {}
        for stem, (key, i) in DELTA_COLUMNS.items():
            v = d.get(key)
            out[f"{stem}_{k}"] = v[i] if i is not None and v is not None else v
    return out


def readme_markers(out: Path) -> tuple[str, str]:
    """The markers of a results folder's block: `<!-- results:NAME:start -->` for results/NAME, so one
    README shows several published runs (the study, then its pilot)."""
    return f"<!-- results:{Path(out).name}:start -->", f"<!-- results:{Path(out).name}:end -->"


def update_readme(readme: Path, tables: dict, plots: dict, out: Path) -> None:
    """Replace the README's block for `out` (its named markers, else the plain ones) with these tables."""
    text = readme.read_text(encoding="utf-8")
    start, end = readme_markers(out)
    if start not in text or end not in text:
        start, end = README_START, README_END
    if start not in text or end not in text:
        named = " ... ".join(readme_markers(out))
        raise TTABenchError(
            f"{readme} has no {named} (or {README_START} ... {README_END}) block; add the two markers where the results go"
        )
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    note = f"_Generated by `python -m tta_bench leaderboard {out} --readme {readme.name}` from the committed cell files._\n\n"
    block = (
        f"{start}\n{note}{markdown(tables, level=3, plots={k: v.replace(os.sep, '/') for k, v in plots.items()})}{end}"
    )
    atomic_write(readme, head + block + tail)
