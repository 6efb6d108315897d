"""Rendering leaderboard tables (rows from tta_bench.results.leaderboard.rows): Markdown, a sortable HTML
page, and the plot of perplexity against FLOPs with its Pareto front."""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

from tta_bench.results.files import atomic_write

# (key in a row, Markdown header, format); arrows say which way is better
COLUMNS = [
    ("method", "method", "s"),
    ("kind", "kind", "s"),
    ("token_ppl", "token ppl ↓", ".2f"),
    ("ci95", "95% CI", ""),
    ("vs_none", "Δ ppl vs none [95% CI]", ""),
    ("vs_control", "Δ ppl vs control [95% CI]", ""),
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
    "Rows sorted by token perplexity. ± is the std over seeds; the 95% CI is a bootstrap over documents."
    " Δ vs none and Δ vs control are differences in token perplexity with paired bootstrap CIs (the same"
    " resampled documents for both cells); * marks a CI that excludes 0. kind: TTA adapts to the evaluated"
    " text as it reads it; a control is prepared on the prepare split and then static (SPEC 3); a TTA row's"
    " control is named after its Δ (none when nothing was trained). Ratios (× none) are to the `none` cell on"
    " the identical stream and device; n/a where there is none. prepare: building the cell's prepared state"
    " (training, datastore, statistics, the shared feature pass), counted whether it was cached or not."
)


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return format(v, spec) if spec else str(v)


def _cell_text(r: dict, key: str, spec: str) -> str:
    if key == "token_ppl":
        return _fmt(r["token_ppl"], spec) + (f" ± {r['token_ppl_std']:.2f}" if r["token_ppl_std"] is not None else "")
    if key == "ci95":
        return f"[{_fmt(r['ci95_low'], '.2f')}, {_fmt(r['ci95_high'], '.2f')}]"
    if key in ("vs_none", "vs_control"):
        d = r[key]
        if d is None:
            return "—" if r["method"] == "none" or (key == "vs_control" and r["kind"] != "TTA") else "n/a"
        lo, hi = d["ci95"]
        text = f"{d['delta_ppl']:+.2f} [{lo:+.2f}, {hi:+.2f}]{'*' if d['excludes_zero'] else ''}"
        return text + (f" vs {r['control']}" if key == "vs_control" else "")
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
        parts += (
            ["", *(f"- **failed**: `{r['method']}`: {r['reason']} ([traceback]({r['log']}))" for r in failed)]
            if failed
            else []
        )
        if plots and key in plots:
            parts += ["", f"![perplexity against FLOPs, {_title(key)}]({plots[key]})"]
        parts.append("")
    parts.append(FOOTNOTE)
    return "\n".join(parts) + "\n"


def html_page(tables: dict[tuple, list[dict]], plots: dict | None = None) -> str:
    """One self-contained page; click a header to sort (numbers by value, n/a last)."""
    out = [
        "<!doctype html><meta charset='utf-8'><title>tta-bench leaderboard</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1em}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "th{cursor:pointer;background:#f4f4f4}img{max-width:720px}</style>",
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
                raw = {"ci95": r["ci95_low"], "method": None, "kind": None}.get(k, r.get(k))
                if isinstance(raw, dict):  # a paired difference: sorted by its point estimate
                    raw = raw["delta_ppl"]
                sort_value = "" if raw is None or isinstance(raw, str) else repr(float(raw))
                cells.append(f"<td data-v='{sort_value}'>{html.escape(_cell_text(r, k, spec))}</td>")
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</tbody></table>")
        out += [
            f"<p><b>failed</b>: {html.escape(r['method'])}: {html.escape(r['reason'])}"
            f" (<a href='{html.escape(r['log'])}'>traceback</a>)</p>"
            for r in failed
        ]
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
    ax.plot(
        [pts[i][0] for i in front],
        [pts[i][1] for i in front],
        "--o",
        color="tab:red",
        markersize=12,
        markerfacecolor="none",
        label="Pareto front (no method both cheaper and better)",
    )
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
