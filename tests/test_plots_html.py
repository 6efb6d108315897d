"""The leaderboard's plot (labels never overlap, measured on the rendered figure) and its HTML page
(sortable by column, clicked in a real headless Chromium: `-m slow`)."""

import itertools
import re
import shutil
import subprocess

import numpy as np
import pytest

from tta_bench.results.plots import delta_figure
from tta_bench.results.render import COLUMNS, html_page

KEY = ("wikitext-2", "tiny", "segment 512, context 1, reset document", "tokens 4096", "cpu")


def _row(method, x, t, dnll, kind="TTA", control="none", dctl=None):
    def d(v):
        return (
            None
            if v is None
            else {
                "delta_nll": v,
                "nll_ci95": [v - 0.05, v + 0.04],
                "delta_bpb": v / 3,
                "bpb_ci95": None,
                "delta_ppl": 10 * v,
                "delta_pct": 5 * v,
                "seed_std": None,
                "significant": v < -0.1,
            }
        )

    vs_none = d(dnll)
    return {"method": method, "kind": kind, "status": "ok", "flops_x_none": x, "time_x_none": t,
            "token_ppl": 20 + 10 * (dnll or 0), "token_ppl_std": None, "ci95_low": 18.0, "ci95_high": 22.0,
            "control": control, "vs_none": vs_none, "vs_control": vs_none if control == "none" else d(dctl),
            "bits_per_byte": 1.0, "word_ppl": 50.0, "gflops_per_token": x * 0.15, "tokens_per_s": 100 / t,
            "peak_mem_mb": 1000.0, "prepare_s": 0.0, "prepare_tflops": None, "seeds": 1}  # fmt: skip


def _crowded_table(seed: int) -> list[dict]:
    """The study's shape: a dozen methods, most at about the base cost, their deltas close together."""
    rng = np.random.default_rng(seed)
    table = [_row("none", 1.0, 1.0, None, kind="base", control=None)]
    table[0]["vs_none"] = None
    names = ["cache", "knn-lm", "knn-cache", "fwl", "fwl-static", "fwl-dynamic-eval", "finetune"]
    names += ["finetune-dynamic-eval", "dynamic-eval sgd", "dynamic-eval rms", "dynamic-eval lora", "ttt-nn"]
    for name in names:
        x = float(rng.choice([1.0, 1.02, 1.05, 1.27, 1.8, 3.0]))
        control = "fwl-static" if name.startswith("fwl") and name != "fwl-static" else "none"
        table.append(
            _row(name, x, x * rng.uniform(0.8, 1.2), float(rng.uniform(-0.2, 0.01)), control=control, dctl=0.0)
        )
    return table


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plot_labels_never_overlap(seed):
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    fig = delta_figure(KEY, _crowded_table(seed))
    try:
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            labels = [t for t in ax.texts if t.get_gid() == "label"]
            assert sorted(t.get_text() for t in labels) == sorted(r["method"] for r in _crowded_table(seed))
            fig.canvas.draw()  # every annotation's text at its final place
            boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the text, not its leader line
            for (a, ta), (b, tb) in itertools.combinations(zip(boxes, labels), 2):
                overlap = a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1
                assert not overlap, (ta.get_text(), tb.get_text())
    finally:
        plt.close(fig)


def test_no_plot_without_a_none_cell():
    table = [r for r in _crowded_table(0) if r["method"] != "none"]
    for r in table:
        r["flops_x_none"] = r["time_x_none"] = None
    assert delta_figure(KEY, table) is None


CLICK = """<script>
window.addEventListener('load', () => {{
  const th = document.querySelectorAll('table.lb th')[{col}];
  for (let i = 0; i < {clicks}; i++) th.click();
}});
</script>"""


def _chromium(*args, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("needs chromium (apt-get install -y chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=2000"]  # fmt: skip
    out = subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _order(dom: str) -> list[str]:
    body = dom.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [re.search(r"<td[^>]*>([^<]*)</td>", tr).group(1) for tr in body.split("<tr>")[1:]]


@pytest.mark.slow
def test_the_html_leaderboard_sorts_by_a_clicked_column_in_chromium(tmp_path):
    table = _crowded_table(0)
    page = html_page({KEY: table})
    col = [k for k, _, _ in COLUMNS].index("vs_none:nll")
    by_delta = sorted((r for r in table if r["vs_none"]), key=lambda r: r["vs_none"]["delta_nll"])
    expected = {1: [r["method"] for r in by_delta] + ["none"], 2: [r["method"] for r in by_delta[::-1]] + ["none"]}
    shots = tmp_path / "shots"
    shots.mkdir()
    for clicks in (0, 1, 2):
        path = tmp_path / f"clicked{clicks}.html"
        path.write_text(page.replace("</script>", "</script>" + CLICK.format(col=col, clicks=clicks), 1))
        order = _order(_chromium("--dump-dom", path.as_uri(), tmp_path=tmp_path))
        if clicks == 0:  # as written: by perplexity
            assert order == [r["method"] for r in table]
        else:  # ascending, then descending; n/a (none's) last either way
            assert order == expected[clicks]
        _chromium(
            f"--screenshot={shots / f'leaderboard-{clicks}.png'}",
            "--window-size=1600,700",
            path.as_uri(),
            tmp_path=tmp_path,
        )
        assert (shots / f"leaderboard-{clicks}.png").stat().st_size > 1000
    keep = shutil.os.environ.get("TTA_SHOTS")  # e.g. /tmp/shots: where to keep the screenshots to look at
    if keep:
        shutil.copytree(shots, keep, dirs_exist_ok=True)
