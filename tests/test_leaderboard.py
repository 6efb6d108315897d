"""Leaderboards (SPEC 7): every number recomputed independently from the cell files."""

import json
import math
import shutil
import textwrap

import pandas as pd
import pytest
from scipy import stats

from tests.conftest import write_bench
from tta_bench.api.errors import TTABenchError
from tta_bench.results.leaderboard import _mark_holm, write_leaderboard
from tta_bench.results.render import pareto_front
from tta_bench.run.runner import run

PLUGIN = textwrap.dedent('''
    import math
    from dataclasses import dataclass

    import torch

    from tta_bench import register_method
    from tta_bench.api.method import Method


    @register_method("lb-uniform")
    class Uniform(Method):
        """Uniform over the vocabulary."""

        @classmethod
        def adapts_at_test_time(cls, params):
            return False

        def score(self, seg):
            return torch.full((seg.n, self.lm.vocab_size), -math.log(self.lm.vocab_size))


    @register_method("lb-temperature")
    class Temperature(Method):
        """The base model's logits divided by a temperature; a made-up adaptation cost."""

        @dataclass
        class Params:
            t: float = 2.0

        @classmethod
        def adapts_at_test_time(cls, params):
            return True  # stands in for a method that adapts: it reports adaptation flops

        @torch.no_grad()
        def score(self, seg):
            return torch.log_softmax(self.lm.logits(self.lm.hidden(seg.ids)[0, -seg.n:]) / self.params.t, -1)

        def adapt(self, seg):
            self.ledger.add("adapt.made_up", 1e6 * seg.n)
''')


@pytest.fixture()
def results(tmp_path, corpus):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "lb.py").write_text(PLUGIN)
    bench = write_bench(
        tmp_path,
        corpus,
        plugins=[str(plugins)],
        seeds=[0, 1],
        methods=["none", "lb-uniform", {"name": "lb-temperature", "t": 2.0}],
    )
    return run(str(bench), log=lambda *a: None), bench


def _naive_ratio_ci(num, den):
    """sum(num)/sum(den) and its HC2 t-interval with Satterthwaite's df, one document at a time."""
    n, total = len(num), sum(den)
    r = sum(num) / total
    var = sum((a - r * w) ** 2 / (1 - w / total) for a, w in zip(num, den)) / total**2
    df = max(1.0, sum(w * w for w in den) ** 2 / sum(w**4 for w in den) - 1)
    q = stats.t.ppf(0.975, df)
    p = 2 * stats.t.sf(abs(r) / math.sqrt(var), df) if var > 0 else None
    return r, [r - q * math.sqrt(var), r + q * math.sqrt(var)], p, n


def _independent(cells: list[dict]) -> dict[str, dict]:
    """Per method label: the leaderboard's numbers from the raw per-document NLLs and costs."""
    out = {}
    for label in {c["label"] for c in cells}:
        cs = [c for c in cells if c["label"] == label]
        ppl = [math.exp(sum(d["nll"] for d in c["per_doc"]) / sum(d["tokens"] for d in c["per_doc"])) for c in cs]
        mean = sum(ppl) / len(ppl)
        flops = [sum(c["costs"]["flops"].values()) / sum(d["tokens"] for d in c["per_doc"]) / 1e9 for c in cs]
        bpb = [sum(d["nll"] for d in c["per_doc"]) / math.log(2) / sum(d["bytes"] for d in c["per_doc"]) for c in cs]
        spt = [1 / c["costs"]["tokens_per_second"] for c in cs]
        n_docs, tokens = len(cs[0]["per_doc"]), sum(d["tokens"] for d in cs[0]["per_doc"])
        doc_nll = [sum(c["per_doc"][i]["nll"] for c in cs) / len(cs) for i in range(n_docs)]
        seed_mean_nll = sum(doc_nll)
        out[label] = {
            "token_ppl": mean,
            "ppl_of_mean_nll": math.exp(seed_mean_nll / tokens),
            "std": math.sqrt(sum((p - mean) ** 2 for p in ppl) / (len(ppl) - 1)),
            "gflops": sum(flops) / len(flops),
            "bpb": sum(bpb) / len(bpb),
            "spt": sum(spt) / len(spt),
            "doc_nll": doc_nll,
            "doc_tokens": [d["tokens"] for d in cs[0]["per_doc"]],
            "doc_bytes": [d["bytes"] for d in cs[0]["per_doc"]],
            "ci_low": math.exp(_naive_ratio_ci(doc_nll, [d["tokens"] for d in cs[0]["per_doc"]])[1][0]),
            "seeds": len(cs),
        }
    return out


def _check_contrasts(row, r: dict, none: dict, cells: list[dict]) -> None:
    """A CSV row's paired differences and marks against the naive recomputation."""
    # the paired difference is taken on the per-document NLL averaged over seeds
    if row["method"] == "none":
        assert math.isnan(row["delta_ppl_vs_none"]) and math.isnan(row["dnll_vs_none"])
    else:
        diff = [a - b for a, b in zip(r["doc_nll"], none["doc_nll"])]
        dnll, ci, p, _ = _naive_ratio_ci(diff, r["doc_tokens"])
        assert row["dnll_vs_none"] == pytest.approx(dnll)
        assert [row["dnll_ci95_low_vs_none"], row["dnll_ci95_high_vs_none"]] == pytest.approx(ci)
        assert row["p_vs_none"] == pytest.approx(p)
        dbpb, ci, _, _ = _naive_ratio_ci([d / math.log(2) for d in diff], r["doc_bytes"])
        assert row["dbpb_vs_none"] == pytest.approx(dbpb)
        assert [row["dbpb_ci95_low_vs_none"], row["dbpb_ci95_high_vs_none"]] == pytest.approx(ci)
        assert row["delta_ppl_vs_none"] == pytest.approx(r["ppl_of_mean_nll"] - none["ppl_of_mean_nll"])
        assert row["delta_ppl_ci95_low_vs_none"] <= row["delta_ppl_vs_none"] <= row["delta_ppl_ci95_high_vs_none"]
    assert row["ci95_low"] == pytest.approx(r["ci_low"])
    if row["method"] == "lb-temperature":  # the one declared contrast: its own Holm family of one
        assert row["p_holm_vs_none"] == pytest.approx(row["p_vs_none"])
        assert row["significant_vs_none"] == (row["p_vs_none"] < 0.05)
        per_seed = [
            (sum(d["nll"] for d in c["per_doc"]) - sum(none["doc_nll"])) / sum(r["doc_tokens"])
            for c in cells
            if c["label"] == row["method"]
        ]
        mean = sum(per_seed) / 2
        assert row["dnll_seed_std_vs_none"] == pytest.approx(
            math.sqrt(sum((x - mean) ** 2 for x in per_seed)), abs=1e-12
        )
    if row["method"] == "lb-uniform":  # a control against none: not a declared contrast, never marked
        assert row["p_vs_none"] > 0 and math.isnan(row["p_holm_vs_none"]) and not row["significant_vs_none"]


def test_every_table_number_matches_the_cell_files(results):
    run_dir, _ = results
    cells = [json.loads(p.read_text()) for p in (run_dir / "cells").glob("*.json")]
    assert len(cells) == 6
    ref = _independent(cells)
    table = pd.read_csv(run_dir / "leaderboard.csv")
    as_json = json.loads((run_dir / "leaderboard.json").read_text())
    md = (run_dir / "leaderboard.md").read_text()
    assert list(table["token_ppl"]) == sorted(table["token_ppl"])
    assert len(table) == len(as_json) == 3
    for _, row in table.iterrows():
        r, none = ref[row["method"]], ref["none"]
        assert row["token_ppl"] == pytest.approx(r["token_ppl"])
        assert row["seeds"] == r["seeds"] == 2
        assert row["token_ppl_std"] == pytest.approx(r["std"], abs=1e-9)
        assert row["bits_per_byte"] == pytest.approx(r["bpb"])
        assert row["gflops_per_token"] == pytest.approx(r["gflops"])
        assert row["flops_x_none"] == pytest.approx(r["gflops"] / none["gflops"])
        assert row["time_x_none"] == pytest.approx(r["spt"] / none["spt"])
        _check_contrasts(row, r, none, cells)
        j = next(x for x in as_json if x["method"] == row["method"])
        assert j["token_ppl"] == pytest.approx(r["token_ppl"])
        assert f"| {row['method']}" in md and f"{r['token_ppl']:.2f} ± {r['std']:.2f}" in md
    assert ref["lb-uniform"]["token_ppl"] == pytest.approx(258)  # closed form
    assert ref["lb-uniform"]["gflops"] == 0 and table.set_index("method").loc["lb-uniform", "flops_x_none"] == 0
    for ext in ("png", "svg"):
        assert len(list(run_dir.glob(f"plot-*.{ext}"))) == 1
    page = (run_dir / "leaderboard.html").read_text()
    assert page.count("<tr>") == 1 + 3 and "lb-temperature" in page and "<script>" in page


def test_without_a_none_cell_ratios_are_na(results, tmp_path):
    run_dir, _ = results
    alone = tmp_path / "alone"
    (alone / "cells").mkdir(parents=True)
    for p in (run_dir / "cells").glob("*.json"):
        if json.loads(p.read_text())["label"] != "none":
            shutil.copy(p, alone / "cells")
    write_leaderboard(alone)
    table = pd.read_csv(alone / "leaderboard.csv")
    assert table["flops_x_none"].isna().all() and table["time_x_none"].isna().all()
    assert "n/a" in (alone / "leaderboard.md").read_text()


def test_merging_folders_refuses_conflicting_provenance(results, tmp_path):
    run_dir, _ = results
    other = tmp_path / "other"
    (other / "cells").mkdir(parents=True)
    for p in (run_dir / "cells").glob("*.json"):
        rec = json.loads(p.read_text())
        if rec["label"] == "none":
            rec["cell_id"] = "x" + rec["cell_id"][1:]  # the same cell computed elsewhere ...
            rec["stream"]["fingerprint"] = "different-data"  # ... on different data
            (other / "cells" / f"{rec['cell_id']}.json").write_text(json.dumps(rec))
    with pytest.raises(TTABenchError, match="data hash"):
        write_leaderboard([run_dir, other], out=tmp_path / "merged")
    write_leaderboard([run_dir, other], out=tmp_path / "merged", allow_mixed=True)
    merged = pd.read_csv(tmp_path / "merged" / "leaderboard.csv")
    assert merged.set_index("method").loc["none", "seeds"] == 4  # two seeds from each folder
    # folders with the same cells merge without duplicates
    write_leaderboard([run_dir, run_dir], out=tmp_path / "same")
    assert pd.read_csv(tmp_path / "same" / "leaderboard.csv")["seeds"].tolist() == [2, 2, 2]


def test_pareto_front_is_the_set_of_undominated_points():
    pts = [(1.0, 30.0), (2.0, 25.0), (3.0, 26.0), (1.5, 31.0), (4.0, 20.0), (0.5, 40.0)]
    front = pareto_front(pts)
    dominated = {i for i, (x, y) in enumerate(pts) if any(x2 <= x and y2 <= y and (x2, y2) != (x, y) for x2, y2 in pts)}
    assert set(front) == set(range(len(pts))) - dominated


def test_readme_block_is_regenerated_in_place(results, tmp_path):
    run_dir, _ = results
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\noutro\n")
    write_leaderboard(run_dir, readme=readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "\nold\n" not in text
    assert "| lb-uniform" in text and "![ΔNLL/token against FLOPs and time" in text


def test_a_readme_with_a_block_per_results_folder_gets_each_folders_tables_in_its_own(results, tmp_path):
    run_dir, _ = results
    name = run_dir.name
    readme = tmp_path / "README.md"
    readme.write_text(
        f"a\n<!-- results:{name}:start -->\nSTALE-TABLE\n<!-- results:{name}:end -->\n"
        "b\n<!-- results:other:start -->\nkept\n<!-- results:other:end -->\nc\n"
    )
    write_leaderboard(run_dir, readme=readme)
    text = readme.read_text()
    ours = text.split(f"<!-- results:{name}:start -->")[1].split(f"<!-- results:{name}:end -->")[0]
    assert "| lb-uniform" in ours and "STALE-TABLE" not in ours
    assert "<!-- results:other:start -->\nkept\n<!-- results:other:end -->" in text and text.endswith("c\n")
    readme.write_text("no markers\n")
    with pytest.raises(TTABenchError, match=f"results:{name}:start"):
        write_leaderboard(run_dir, readme=readme)


def test_a_rerun_that_computes_nothing_keeps_the_tables_unless_one_is_missing(results):
    run_dir, bench = results
    said = []
    run(str(bench), log=said.append)
    assert any("is up to date: no cell changed" in s for s in said) and not any(s.startswith("wrote") for s in said)
    (run_dir / "leaderboard.csv").unlink()
    said.clear()
    run(str(bench), log=said.append)
    assert (run_dir / "leaderboard.csv").is_file() and any(s.startswith("wrote") for s in said)


def _delta(p, zero=False):
    return {"p": p, "zero_width": zero, "p_holm": None, "significant": False, "declared": False}


def test_holm_marks_only_declared_contrasts_and_never_a_zero_width_one():
    shared = _delta(0.004)  # a TTA row whose control is none: one contrast, counted once
    rows = [
        {"kind": "TTA", "vs_none": shared, "vs_control": shared},
        {"kind": "TTA", "vs_none": _delta(0.03), "vs_control": _delta(0.011)},
        {"kind": "TTA", "vs_none": _delta(0.0, zero=True), "vs_control": _delta(None, zero=True)},
        {"kind": "control", "vs_none": _delta(1e-9), "vs_control": None},
    ]
    _mark_holm(rows)
    family = [0.004, 0.03, 0.011, 0.0]  # Holm over the 4 tested p-values: sorted, times 4, 3, 2, 1, running max
    expected = {0.0: 0.0, 0.004: 0.012, 0.011: 0.022, 0.03: 0.03}
    got = [rows[0]["vs_none"], rows[1]["vs_none"], rows[1]["vs_control"], rows[2]["vs_none"]]
    for p, d in zip(family, got):
        assert d["declared"] and d["p_holm"] == pytest.approx(expected[p])
    assert [d["significant"] for d in got] == [True, True, True, False]  # the zero-width one is never marked
    assert rows[2]["vs_control"]["p_holm"] is None and not rows[2]["vs_control"]["significant"]
    assert not rows[3]["vs_none"]["declared"] and not rows[3]["vs_none"]["significant"]
