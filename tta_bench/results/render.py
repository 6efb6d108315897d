"""Rendering leaderboard tables (rows from tta_bench.results.leaderboard.rows): Markdown, a sortable HTML
page (click a header to sort), and the Pareto front the plots (plots.py) draw."""

from __future__ import annotations

import html
import math
import re


# (key in a row, Markdown header, format); arrows say which way is better
COLUMNS = [
    ("method", "method", "s"),
    ("kind", "kind", "s"),
    ("token_ppl", "token ppl ↓", ".2f"),
    ("ci95", "95% CI", ""),
    ("vs_none:nll", "ΔNLL/token vs none [95% CI] ↓", ""),
    ("vs_none:bpb", "Δbits/byte vs none [95% CI] ↓", ""),
    ("vs_none:ppl", "Δppl vs none", ""),
    ("vs_control:nll", "ΔNLL/token vs control [95% CI] ↓", ""),
    ("vs_control:bpb", "Δbits/byte vs control [95% CI] ↓", ""),
    ("vs_control:ppl", "Δppl vs control", ""),
    ("bits_per_byte", "bits/byte ↓", ".4f"),
    ("word_ppl", "word ppl ↓", ".2f"),
    ("gflops_per_token", "GFLOPs/token ↓", ".3f"),
    ("flops_x_none", "FLOPs × none ↓", ".2f"),
    ("tokens_per_s", "tokens/s ↑", ".0f"),
    ("time_x_none", "time × none ↓", ".2f"),
    ("peak_mem_mb", "peak mem MB ↓", ".0f"),
    ("prepare_s", "prepare s", ".0f"),
    ("prepare_tflops", "prepare TFLOPs", ".1f"),
    ("seeds", "seeds", "d"),
]
FOOTNOTE = (
    "Rows sorted by token perplexity. ± after a perplexity is the std over seeds; its 95% CI is a t-interval"
    " over documents on the per-document NLL averaged over seeds (SPEC 4). ΔNLL/token (nats, token-weighted:"
    " the sum of per-document NLL differences over all tokens; negative: better) and Δbits/byte are paired"
    " over documents (both cells on the same documents, so document difficulty cancels), with t-intervals"
    " whose 95% coverage holds at 8 and 16 documents (tests/test_intervals.py); ± after a ΔNLL is the std over"
    " the method's seeds; Δppl (token perplexity) is beside them. * marks a ΔNLL whose p-value, Holm-adjusted"
    " over the contrasts the table declares (each TTA row against none and against its control), is below"
    " 0.05; a zero-width interval (a deterministic difference, e.g. two cells equal on every document) is"
    " never marked, nor is a control's difference to none (not a declared contrast). kind: TTA adapts to the"
    " evaluated text as it reads it; a control is prepared on the prepare split and then static (SPEC 3); a"
    " TTA row's control is named after its Δ (none when nothing was trained). Ratios (× none) are to the"
    " `none` cell on the identical stream and device; n/a where there is none. prepare: building the cell's"
    " prepared state (training, datastore, statistics, the shared feature pass), counted whether it was"
    " cached or not."
)


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return format(v, spec) if spec else str(v)


def _interval(point: float | None, ci: list | None, spec: str) -> str:
    if point is None:
        return "n/a"
    return format(point, spec) + (f" [{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else "")


def delta_text(d: dict, what: str) -> str:
    """One paired difference as text: nll (with its seed spread and Holm mark), bpb, or ppl."""
    if what == "nll":
        seed = f" ± {d['seed_std']:.4f}" if d.get("seed_std") is not None else ""
        return _interval(d["delta_nll"], d["nll_ci95"], "+.4f") + seed + ("*" if d.get("significant") else "")
    if what == "bpb":
        return _interval(d["delta_bpb"], d["bpb_ci95"], "+.4f")
    return f"{d['delta_ppl']:+.2f} ({d['delta_pct']:+.1f}%)"


def _cell_text(r: dict, key: str, spec: str) -> str:
    if key == "token_ppl":
        return _fmt(r["token_ppl"], spec) + (f" ± {r['token_ppl_std']:.2f}" if r["token_ppl_std"] is not None else "")
    if key == "ci95":
        return f"[{_fmt(r['ci95_low'], '.2f')}, {_fmt(r['ci95_high'], '.2f')}]"
    if ":" in key:
        which, what = key.split(":")
        d = r[which]
        if d is None:
            return "—" if r["method"] == "none" or (which == "vs_control" and r["kind"] != "TTA") else "n/a"
        return delta_text(d, what) + (f" vs {r['control']}" if which == "vs_control" and what == "nll" else "")
    return _fmt(r[key], spec)


def sort_value(r: dict, key: str):
    """The number a column sorts by (None: n/a, sorted last)."""
    if ":" in key:
        which, what = key.split(":")
        d = r.get(which)
        return None if d is None else d[{"nll": "delta_nll", "bpb": "delta_bpb", "ppl": "delta_ppl"}[what]]
    raw = {"ci95": r.get("ci95_low"), "method": None, "kind": None}.get(key, r.get(key))
    return None if isinstance(raw, str) else raw


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
        parts += (
            ["", *(f"- **failed**: `{r['method']}`: {r['reason']} ([traceback]({r['log']}))" for r in failed)]
            if failed
            else []
        )
        if plots and key in plots:
            parts += ["", f"![ΔNLL/token against FLOPs and time, {_title(key)}]({plots[key]})"]
        parts.append("")
    parts.append(FOOTNOTE)
    return "\n".join(parts) + "\n"


def html_page(tables: dict[tuple, list[dict]], plots: dict | None = None) -> str:
    """One self-contained page; click a header to sort (numbers by value, n/a last)."""
    out = [
        "<!doctype html><meta charset='utf-8'><title>tta-bench leaderboard</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1em}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "th{cursor:pointer;background:#f4f4f4}td{white-space:nowrap}img{max-width:1100px}"
        "th[data-dir=asc]::after{content:' \\25B2'}th[data-dir=desc]::after{content:' \\25BC'}</style>",
        "<h1>tta-bench leaderboard</h1>",
    ]
    for key, table in sorted(tables.items()):
        out.append(
            f"<h2>{html.escape(_title(key))}</h2><p><i>{html.escape(_subtitle(key))}</i></p><table class='lb'><thead><tr>"
        )
        out += [f"<th>{html.escape(h)}</th>" for _, h, _ in COLUMNS]
        out.append("</tr></thead><tbody>")
        ok, failed = _split(table)
        for r in ok:
            cells = []
            for k, _, spec in COLUMNS:
                raw = sort_value(r, k)
                v = "" if raw is None else repr(float(raw))
                cells.append(f"<td data-v='{v}'>{html.escape(_cell_text(r, k, spec))}</td>")
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</tbody></table>")
        out += [
            f"<p><b>failed</b>: {html.escape(r['method'])}: {html.escape(r['reason'])}"
            f" (<a href='{html.escape(r['log'])}'>traceback</a>)</p>"
            for r in failed
        ]
        if plots and key in plots:
            out.append(f"<img src='{html.escape(plots[key])}' alt='ΔNLL/token against FLOPs and time'>")
    out.append(f"<p style='max-width:70em'>{html.escape(FOOTNOTE)}</p>")
    out.append("""<script>
document.querySelectorAll('table.lb th').forEach((th, i) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], up = th.dataset.dir !== 'asc';
  th.closest('tr').querySelectorAll('th').forEach(h => { delete h.dataset.dir; });
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
