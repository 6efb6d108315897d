"""Plots of a leaderboard table (rows from leaderboard.rows) and of the report's gain curves: the
paired ΔNLL/token against `none` and against the control (interval as error bars) over FLOPs × none
and time × none, two panels; labels placed so that no two overlap (place_labels)."""

from __future__ import annotations

import math
from pathlib import Path

from tta_bench.results.files import atomic_write
from tta_bench.results.render import pareto_front

# label offsets tried around a point, in display pixels: nearest first, 16 directions per ring
_RINGS = (8, 16, 28, 44, 64, 90, 120, 160)
_DIRECTIONS = [
    (math.cos(2 * math.pi * k / 16), math.sin(2 * math.pi * k / 16))
    for k in (0, 2, 14, 4, 12, 6, 10, 8, 1, 15, 3, 13, 5, 11, 7, 9)
]


def text_box(ann, renderer):
    """The box of an annotation's text alone (an Annotation's own extent includes its leader line)."""
    from matplotlib.text import Text

    ann.update_positions(renderer)  # where xytext puts the text (Text's own extent would use xy)
    return Text.get_window_extent(ann, renderer)


def _overlap(a, b, pad: float = 1.0) -> bool:
    return a.x0 < b.x1 + pad and b.x0 < a.x1 + pad and a.y0 < b.y1 + pad and b.y0 < a.y1 + pad


def place_labels(ax, points: list[tuple[float, float]], texts: list[str], fontsize: float = 8) -> list:
    """Annotate each point with its text at the nearest offset (rings of 16 directions) where the
    label's box overlaps no placed label and no point and stays inside the axes; far ones get a
    leader line. The axes' limits must be final. Returns the Text artists (gid 'label')."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    marks = [ax.transData.transform(p) for p in points]
    placed, artists = [], []
    for (x, y), text in zip(points, texts):
        best = None
        for radius in _RINGS:
            for dx, dy in _DIRECTIONS:
                ann = _annotate(ax, (x, y), text, (dx * radius, dy * radius), fontsize, radius > 30)
                box = text_box(ann, renderer)
                inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                hits_mark = any(box.x0 - 4 < mx < box.x1 + 4 and box.y0 - 4 < my < box.y1 + 4 for mx, my in marks)
                if inside and not hits_mark and not any(_overlap(box, b) for b in placed):
                    best = (ann, box)
                    break
                ann.remove()
            if best:
                break
        if best is None:  # crowded beyond every ring: the farthest free spot outside the points
            best = _fallback(ax, (x, y), text, fontsize, placed, renderer)
        placed.append(best[1])
        artists.append(best[0])
    return artists


def _annotate(ax, xy, text, offset, fontsize, leader: bool):
    ha = "left" if offset[0] > 1 else "right" if offset[0] < -1 else "center"
    va = "bottom" if offset[1] > 1 else "top" if offset[1] < -1 else "center"
    arrow = {"arrowstyle": "-", "color": "0.5", "lw": 0.6} if leader else None
    ann = ax.annotate(
        text, xy, xytext=offset, textcoords="offset pixels", fontsize=fontsize, ha=ha, va=va, arrowprops=arrow
    )
    ann.set_gid("label")
    return ann


def _fallback(ax, xy, text, fontsize, placed, renderer):
    """A lane above the axes' top edge, one label a row, each free of the ones before."""
    frame = ax.get_window_extent(renderer)
    px = ax.transData.transform(xy)
    row = 0
    while True:
        offset = (0, frame.y1 - px[1] - 12 - 12 * row)
        ann = _annotate(ax, xy, text, offset, fontsize, True)
        box = text_box(ann, renderer)
        if row > 500 or not any(_overlap(box, b) for b in placed):  # bounded: a label is never dropped
            return ann, box
        ann.remove()
        row += 1


def _points(table: list[dict], xkey: str) -> list[dict]:
    """One entry a row that has the x ratio and a difference to none."""
    out = []
    for r in table:
        if r.get("status") == "failed" or r.get(xkey) is None:
            continue
        if r["method"] == "none":
            out.append({"label": "none", "x": r[xkey], "none": (0.0, None), "control": None})
            continue
        d, c = r.get("vs_none"), r.get("vs_control")
        if d is None or d["delta_nll"] is None:
            continue
        ctrl = (c["delta_nll"], c["nll_ci95"], r["control"]) if c is not None and r["control"] != "none" else None
        out.append({"label": r["method"], "x": r[xkey], "none": (d["delta_nll"], d["nll_ci95"]), "control": ctrl})
    return out


def _err(y, ci):
    return None if not ci else [[max(0.0, y - ci[0])], [max(0.0, ci[1] - y)]]


def _panel(ax, pts: list[dict], xlabel: str) -> None:
    from matplotlib.ticker import FuncFormatter

    for p in pts:
        y, ci = p["none"]
        ax.errorbar([p["x"]], [y], yerr=_err(y, ci), fmt="o", capsize=3, color="tab:blue", ms=5)
        if p["control"]:
            yc, cic, _ = p["control"]
            ax.plot([p["x"]] * 2, [y, yc], color="0.7", lw=0.8, zorder=0)
            ax.errorbar([p["x"]], [yc], yerr=_err(yc, cic), fmt="s", capsize=3, color="tab:orange", ms=5)
    front = pareto_front([(p["x"], p["none"][0]) for p in pts])
    ax.plot([pts[i]["x"] for i in front], [pts[i]["none"][0] for i in front], "--", color="tab:red", lw=0.8)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.1g}"[0] in "25" else ""))
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.2)
    ax.autoscale_view()
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())


def delta_figure(key: tuple, table: list[dict]):
    """ΔNLL/token against none (circles) and against the control (squares; a grey line joins a
    method's two) with their paired 95% intervals, over FLOPs × none and time × none; the dashed
    line is the Pareto front against none. None without a `none` cell to take ratios to."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = [(k, _points(table, k)) for k in ("flops_x_none", "time_x_none")]
    if not all(pts for _, pts in panels):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), dpi=120, sharey=True)
    for ax, (k, pts), xlabel in zip(axes, panels, ("FLOPs per token × none (log)", "time per token × none (log)")):
        _panel(ax, pts, xlabel)
    lo = min(ax.get_ylim()[0] for ax in axes)
    hi = max(ax.get_ylim()[1] for ax in axes)
    axes[0].set_ylabel("ΔNLL per token, nats (95% CI; < 0: better)")
    handles = [
        Line2D([], [], marker="o", color="tab:blue", ls="", label="vs none"),
        Line2D([], [], marker="s", color="tab:orange", ls="", label="vs its control (grey line: same method)"),
        Line2D([], [], ls="--", color="tab:red", label="Pareto front vs none"),
    ]
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, 0.93))
    fig.suptitle(f"{key[0]} · {key[1]}; {key[2]}; {key[3]}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    for ax, (_, pts) in zip(axes, panels):
        ax.set_ylim(lo, hi)
        place_labels(ax, [(p["x"], p["none"][0]) for p in pts], [p["label"] for p in pts])
    return fig


def plot(key: tuple, table: list[dict], stem: Path) -> list[Path]:
    """delta_figure as PNG and SVG at `stem`; [] where there is nothing to plot."""
    import matplotlib.pyplot as plt

    fig = delta_figure(key, table)
    if fig is None:
        return []
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    try:
        for p in paths:
            atomic_write(p, write=fig.savefig)
    finally:
        plt.close(fig)
    return paths


def gain_curves(key: tuple, curves: dict, path: Path) -> None:
    """The report's gain against position: per test-time method, mean ΔNLL/token against its control by bins
    of position in the document (curves: label -> (control label, [(bin start, mean)]))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, (ref, points) in sorted(curves.items()):
        ax.plot([p[0] + 1 for p in points], [p[1] for p in points], "-o", markersize=3, label=f"{label} vs {ref}")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the document (bin start + 1, tokens)")
    ax.set_ylabel("mean ΔNLL/token vs its control (nats; < 0: better)")
    ax.set_title(f"{key[0]} · {key[1]}\n{key[2]}; {key[3]}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    try:
        atomic_write(path, write=fig.savefig)
    finally:
        plt.close(fig)
