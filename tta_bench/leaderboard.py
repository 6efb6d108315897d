"""Leaderboards from cell records (SPEC 7): one table per (task, model, protocol, limits, device),
rows sorted by perplexity, as Markdown, CSV, JSON, a sortable HTML page, and a Pareto plot of
perplexity against FLOPs. Several results folders merge, unless their provenance conflicts."""
from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from .errors import TTABenchError
from .results import atomic_write, load_cells

# (key in a row, Markdown header, format); arrows say which way is better
COLUMNS = [
    ("method", "method", "s"),
    ("token_ppl", "token ppl ↓", ".2f"),
    ("ci95", "95% CI", ""),
    ("delta_ppl_vs_none", "Δ ppl vs none", "+.2f"),
    ("word_ppl", "word ppl ↓", ".2f"),
    ("bits_per_byte", "bits/byte ↓", ".4f"),
    ("gflops_per_token", "GFLOPs/token ↓", ".3f"),
    ("flops_x_none", "FLOPs × none ↓", ".2f"),
    ("tokens_per_s", "tokens/s ↑", ".0f"),
    ("time_x_none", "time × none ↓", ".2f"),
    ("peak_mem_mb", "peak mem MB ↓", ".0f"),
    ("prepare_s", "prepare s", ".1f"),
    ("seeds", "seeds", "d"),
]
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def table_key(rec: dict) -> tuple:
    cfg = rec["config"]
    res = rec.get("resolved") or cfg["protocol"]  # a cell that failed early has only its config
    limits = ", ".join(f"{k} {v}" for k, v in sorted(cfg["limits"].items()) if v) or "no limits"
    device = rec["costs"]["device"] if "costs" in rec else rec.get("provenance", {}).get("device", "?")
    return (f"{cfg['task']['name']}:{cfg['task']['split']}", cfg["model"]["name"],
            f"segment {res['segment_len']}, context {res['context_len']}, reset {res['reset']}", limits, device)


def _provenance(rec: dict) -> dict:
    return {"harness version": rec["provenance"]["versions"].get("tta-bench"),
            "data hash": rec["stream"]["fingerprint"],
            "model hash": rec["resolved"]["model_fingerprint"]}


def _current_code() -> dict:
    """Per cell, whether the code that computed it is this checkout's (harness, method, task); None
    where that cannot be told (a method that is no longer registered)."""
    from .registry import code_fingerprint, harness_fingerprint

    harness, cache = harness_fingerprint(), {}

    def current(rec) -> bool | None:
        code, cfg = rec["resume_key"].get("code", {}), rec["config"]
        try:
            for kind, name in (("method", cfg["method"]["name"]), ("task", cfg["task"]["name"])):
                if (kind, name) not in cache:
                    cache[kind, name] = code_fingerprint(kind, name)
        except TTABenchError:
            return None
        return (code.get("harness") == harness and code.get("method") == cache["method", cfg["method"]["name"]]
                and code.get("task") == cache["task", cfg["task"]["name"]])

    return current


def load_records(dirs: list[Path], allow_mixed: bool = False, cell_ids: set | None = None,
                 notes: list | None = None) -> tuple[list[dict], list[dict]]:
    """(finished cells, failed cells) of every folder (only `cell_ids` when given); one copy of a
    cell computed twice. Refuses a table that mixes conflicting provenance, or cells computed by
    this checkout's code with cells computed by other code (stale ones)."""
    notes = [] if notes is None else notes
    seen, records = {}, []
    for d in dirs:
        if not (Path(d) / "cells").is_dir():
            raise TTABenchError(f"{d} has no cells/ folder; give a results folder written by `tta-bench run`")
        for rec in load_cells(Path(d), notes):
            if rec["cell_id"] not in seen and (cell_ids is None or rec["cell_id"] in cell_ids):
                seen[rec["cell_id"]] = d
                records.append(rec)
    failed = [r for r in records if r["status"] == "failed"]
    records = [r for r in records if r["status"] == "ok"]
    if not records and not failed:
        raise TTABenchError(f"no cell records under {', '.join(map(str, dirs))}; run a bench first")
    if not allow_mixed:
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
                    raise TTABenchError(f"cells for {key[0]} · {key[1]} disagree on {what} ({', '.join(sorted(map(str, values)))});"
                                        " rerun `tta-bench run` to recompute stale cells, merge only comparable results,"
                                        " or pass --allow-mixed")
            if found["code"] == {"other (stale)"}:
                notes.append(f"{key[0]} · {key[1]}: every cell was computed by code other than this checkout's")
    return records, failed


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def rows(records: list[dict], failed: list[dict] = ()) -> dict[tuple, list[dict]]:
    """Table rows per key; the seeds of one method setting give mean and std."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for rec in records:
        groups.setdefault(table_key(rec), {}).setdefault(rec["label"], []).append(rec)
    tables = {}
    for key, by_label in groups.items():
        def stats(recs):
            ppl = [r["metrics"]["token_ppl"] for r in recs if r["metrics"]["token_ppl"] is not None]
            return {
                "token_ppl": _mean(ppl),
                "token_ppl_std": float(np.std(ppl, ddof=1)) if len(ppl) > 1 and all(map(math.isfinite, ppl)) else None,
                "ci95_low": _mean((r["metrics"]["ci95"]["token_ppl"] or [None])[0] for r in recs),
                "ci95_high": _mean((r["metrics"]["ci95"]["token_ppl"] or [None, None])[1] for r in recs),
                "word_ppl": _mean(r["metrics"]["word_ppl"] for r in recs),
                "bits_per_byte": _mean(r["metrics"]["bits_per_byte"] for r in recs),
                "gflops_per_token": _mean(r["costs"]["gflops_per_token"] for r in recs),
                "tokens_per_s": _mean(r["costs"]["tokens_per_second"] for r in recs),
                "sec_per_token": _mean(1 / r["costs"]["tokens_per_second"] for r in recs if r["costs"]["tokens_per_second"]),
                "peak_mem_mb": _mean(r["costs"]["peak_memory_bytes"] / 2**20 for r in recs),
                "prepare_s": _mean(r["costs"]["prepare_seconds"] for r in recs),
                "seeds": len(recs),
            }

        base = stats(by_label["none"]) if "none" in by_label else None
        out = []
        for label, recs in by_label.items():
            s = stats(recs)
            ratio = lambda k: s[k] / base[k] if base and s[k] is not None and base[k] else None  # noqa: E731
            comparable = base and s["token_ppl"] is not None and base["token_ppl"]
            s.update(method=label,
                     delta_ppl_vs_none=s["token_ppl"] - base["token_ppl"] if comparable else None,
                     delta_pct_vs_none=100 * (s["token_ppl"] / base["token_ppl"] - 1) if comparable else None,
                     flops_x_none=ratio("gflops_per_token"), time_x_none=ratio("sec_per_token"))
            out.append(s)
        out.sort(key=lambda r: math.inf if r["token_ppl"] is None else r["token_ppl"])
        tables[key] = out
    for rec in failed:  # listed under the table they belong to, never averaged into it
        tables.setdefault(table_key(rec), []).append({"method": rec["label"], "status": "failed", "reason": rec["reason"],
                                                      "log": f"cells/{rec['log']}"})
    return tables


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return format(v, spec) if spec else str(v)


def _cell_text(r: dict, key: str, spec: str) -> str:
    if key == "token_ppl":
        return _fmt(r["token_ppl"], spec) + (f" ± {r['token_ppl_std']:.2f}" if r["token_ppl_std"] is not None else "")
    if key == "ci95":
        return f"[{_fmt(r['ci95_low'], '.2f')}, {_fmt(r['ci95_high'], '.2f')}]"
    if key == "delta_ppl_vs_none":
        d = r["delta_ppl_vs_none"]
        if d is None:
            return "n/a"
        if r["method"] == "none":
            return "—"
        return f"{'↓' if d < 0 else '↑'} {d:+.2f} ({r['delta_pct_vs_none']:+.1f}%)"
    return _fmt(r[key], spec)


def _split(table: list[dict]) -> tuple[list[dict], list[dict]]:
    """(finished rows, failed rows)."""
    return [r for r in table if r.get("status") != "failed"], [r for r in table if r.get("status") == "failed"]


def _title(key: tuple) -> str:
    return f"{key[0]} · {key[1]}"


def _subtitle(key: tuple) -> str:
    return f"{key[2]}; {key[3]}; device: {key[4]}"


def slug(key: tuple) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", f"{key[0]}-{key[1]}-{key[2]}-{key[3]}").strip("-").lower()


def markdown(tables: dict[tuple, list[dict]], level: int = 2, plots: dict | None = None) -> str:
    from tabulate import tabulate

    parts = []
    for key, table in sorted(tables.items()):
        parts += [f"{'#' * level} {_title(key)}", "", f"_{_subtitle(key)}_", ""]
        ok, failed = _split(table)
        body = [[_cell_text(r, k, spec) for k, _, spec in COLUMNS] for r in ok]
        if body:
            parts.append(tabulate(body, headers=[h for _, h, _ in COLUMNS], tablefmt="github", disable_numparse=True))
        parts += ["", *(f"- **failed**: `{r['method']}`: {r['reason']} ([traceback]({r['log']}))" for r in failed)] if failed else []
        if plots and key in plots:
            parts += ["", f"![perplexity against FLOPs, {_title(key)}]({plots[key]})"]
        parts.append("")
    parts.append("Rows sorted by token perplexity. ± is the std over seeds; the 95% CI is a bootstrap over documents."
                 " Ratios (× none) are to the `none` cell on the identical stream and device; n/a where there is none.")
    return "\n".join(parts) + "\n"


def html_page(tables: dict[tuple, list[dict]], plots: dict | None = None) -> str:
    """One self-contained page; click a header to sort (numbers by value, n/a last)."""
    out = ["<!doctype html><meta charset='utf-8'><title>tta-bench leaderboard</title>",
           "<style>body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1em}"
           "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
           "th{cursor:pointer;background:#f4f4f4}img{max-width:720px}</style>",
           "<h1>tta-bench leaderboard</h1>"]
    for key, table in sorted(tables.items()):
        out.append(f"<h2>{html.escape(_title(key))}</h2><p><i>{html.escape(_subtitle(key))}</i></p><table class='lb'><thead><tr>")
        out += [f"<th>{html.escape(h)}</th>" for _, h, _ in COLUMNS]
        out.append("</tr></thead><tbody>")
        ok, failed = _split(table)
        for r in ok:
            cells = []
            for k, _, spec in COLUMNS:
                raw = {"ci95": r["ci95_low"], "method": None}.get(k, r.get(k))
                sort_value = "" if raw is None or isinstance(raw, str) else repr(float(raw))
                cells.append(f"<td data-v='{sort_value}'>{html.escape(_cell_text(r, k, spec))}</td>")
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</tbody></table>")
        out += [f"<p><b>failed</b>: {html.escape(r['method'])}: {html.escape(r['reason'])}"
                f" (<a href='{html.escape(r['log'])}'>traceback</a>)</p>" for r in failed]
        if plots and key in plots:
            out.append(f"<img src='{html.escape(plots[key])}' alt='perplexity against FLOPs'>")
    out.append("""<script>
document.querySelectorAll('table.lb th').forEach((th, i) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], up = th.dataset.dir !== 'asc';
  th.dataset.dir = up ? 'asc' : 'desc';
  const val = tr => { const c = tr.cells[i]; return c.dataset.v === '' ? null : parseFloat(c.dataset.v); };
  [...body.rows].sort((a, b) => {
    const x = val(a), y = val(b);
    if (x === null && y === null) return a.cells[i].textContent.localeCompare(b.cells[i].textContent) * (up ? 1 : -1);
    if (x === null) return 1; if (y === null) return -1;
    return (x - y) * (up ? 1 : -1);
  }).forEach(tr => body.appendChild(tr));
}));
</script>""")
    return "\n".join(out) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both cost (x) and perplexity (y), by increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot(key: tuple, table: list[dict], stem: Path) -> list[Path]:
    """Perplexity against FLOPs (× none when a none cell exists), labelled points, Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [r for r in _split(table)[0] if r["token_ppl"] is not None and math.isfinite(r["token_ppl"])]
    if not table:
        return []
    use_ratio = all(r["flops_x_none"] is not None for r in table)
    xkey = "flops_x_none" if use_ratio else "gflops_per_token"
    pts = [(r[xkey], r["token_ppl"]) for r in table]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r, (x, y) in zip(table, pts):
        err = None
        if r["ci95_low"] is not None and r["ci95_high"] is not None:  # bars never below zero length
            err = [[max(0.0, y - r["ci95_low"])], [max(0.0, r["ci95_high"] - y)]]
        ax.errorbar([x], [y], yerr=err, fmt="o", capsize=3, color="tab:blue")
        ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--o", color="tab:red", markersize=12,
            markerfacecolor="none", label="Pareto front (no method both cheaper and better)")
    ax.set_xlabel("FLOPs per token × none" if use_ratio else "GFLOPs per token")
    ax.set_ylabel("token perplexity (95% CI)")
    ax.set_title(f"{_title(key)}\n{key[2]}; {key[3]}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    xs = [p[0] for p in pts]
    pad = (max(xs) - min(xs)) * 0.15 or max(xs) * 0.1 or 1
    ax.set_xlim(min(xs) - pad, max(xs) + 2 * pad)
    fig.tight_layout()
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    try:
        for p in paths:
            atomic_write(p, write=fig.savefig)
    finally:
        plt.close(fig)
    return paths


def write_leaderboard(dirs, out: Path | None = None, allow_mixed: bool = False, readme: Path | None = None,
                      cell_ids: set | None = None, log=None) -> list[Path]:
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
    flat = [{"task": k[0], "model": k[1], "protocol": k[2], "limits": k[3], "device": k[4], "status": "ok", **r}
            for k, table in sorted(tables.items()) for r in table]
    frame = pd.DataFrame(flat)
    atomic_write(out / "leaderboard.csv", frame.to_csv(index=False))
    atomic_write(out / "leaderboard.json", json.dumps(json.loads(frame.to_json(orient="records")), indent=1))
    atomic_write(out / "leaderboard.html", html_page(tables, plots))
    written += [md, out / "leaderboard.csv", out / "leaderboard.json", out / "leaderboard.html"]
    if readme is not None:
        readme = Path(readme)
        update_readme(readme, tables, {k: os.path.relpath(out / v, readme.resolve().parent) for k, v in plots.items()}, out)
        written.append(Path(readme))
    return written


def update_readme(readme: Path, tables: dict, plots: dict, out: Path) -> None:
    """Replace the README's results block (between the markers) with these tables."""
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise TTABenchError(f"{readme} has no {README_START} ... {README_END} block; add the two markers where the results go")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    note = f"_Generated by `python -m tta_bench leaderboard {out} --readme {readme.name}` from the committed cell files._\n\n"
    block = f"{README_START}\n{note}{markdown(tables, level=3, plots={k: v.replace(os.sep, '/') for k, v in plots.items()})}{README_END}"
    atomic_write(readme, head + block + tail)
