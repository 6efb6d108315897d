"""Registry, bench-file validation and the command line's one-line errors."""

import json
import textwrap

import pytest

from tests.conftest import REPO, cli, write_bench
from tta_bench.run.config import read_yaml, validate
from tta_bench.api.errors import TTABenchError

UNIFORM_PLUGIN = textwrap.dedent('''
    """A plugin living outside the repository."""
    import math
    from dataclasses import dataclass

    import torch

    from tta_bench import register_method
    from tta_bench.api.method import Method


    @register_method("uniform-test")
    class Uniform(Method):
        """Uniform distribution over the vocabulary; reports made-up adaptation flops."""

        @dataclass
        class Params:
            adapt_flops_per_token: float = 123.0

        @classmethod
        def adapts_at_test_time(cls, params):
            return True  # stands in for a method that adapts: it reports adaptation flops

        def score(self, seg):
            return torch.full((seg.n, self.lm.vocab_size), -math.log(self.lm.vocab_size))

        def adapt(self, seg):
            self.ledger.add("adapt.test", self.params.adapt_flops_per_token * seg.n)
''')


def test_listing_is_lazy_and_describes_everything():
    code = (
        "import sys; from tta_bench.api.registry import describe; d = describe('method'); t = describe('task');"
        "print(json_out := __import__('json').dumps({'methods': dict(d), 'tasks': dict(t),"
        " 'torch': 'torch' in sys.modules, 'plugins': [m for m in sys.modules if m.startswith('tta_bench_')]}))"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert not info["torch"] and info["plugins"] == []
    assert "none" in info["methods"] and info["methods"]["none"]
    assert {"wikitext-2", "wikitext-103", "pg19", "text"} <= set(info["tasks"])
    res = cli("list")
    assert res.returncode == 0 and "smollm2-135m" in res.stdout and "tiny" in res.stdout


def test_unknown_names_suggest_the_closest_known_one():
    from tta_bench.api.registry import get

    with pytest.raises(TTABenchError, match=r"did you mean 'none'\?.*known: .*none"):
        get("method", "nonee")
    with pytest.raises(TTABenchError, match="did you mean 'wikitext-2'"):
        get("task", "wikitext2")
    assert get("method", "NONE") is get("method", "none")  # case and -/_ insensitive


def test_plugin_from_a_folder_outside_the_repo_runs_end_to_end(tmp_path, corpus):
    from tta_bench.run.runner import run

    plugins = tmp_path / "my_plugins"
    plugins.mkdir()
    (plugins / "uniform.py").write_text(UNIFORM_PLUGIN, encoding="utf-8")
    bench = write_bench(tmp_path, corpus, plugins=[str(plugins)], methods=["none", "uniform-test"])
    run_dir = run(str(bench), log=lambda *a: None)
    cells = [json.loads(p.read_text()) for p in (run_dir / "cells").glob("*.json")]
    uni = next(c for c in cells if c["config"]["method"]["name"] == "uniform-test")
    n = uni["metrics"]["n_tokens"]
    assert uni["metrics"]["token_ppl"] == pytest.approx(258)  # closed form: uniform over the byte vocabulary
    # the adaptation flops a method reports land under their own key, and in the per-token total
    assert uni["costs"]["flops"]["adapt.test"] == pytest.approx(123.0 * n)
    assert uni["costs"]["flops_per_token"]["adapt.test"] == pytest.approx(123.0)
    assert uni["costs"]["gflops_per_token"] * 1e9 == pytest.approx(sum(uni["costs"]["flops_per_token"].values()))
    assert "forward.body" not in uni["costs"]["flops"]  # it never ran the model


def test_validate_reports_every_problem_with_its_path(tmp_path, corpus):
    bench = write_bench(
        tmp_path,
        corpus,
        protocol={"segmnt_len": 4, "reset": "sometimes", "context_len": 0},
        methods=["nonee", {"name": "none", "lr": 1}],
        models=["tiny", "no-such-model"],
        dtype="float8",
    )
    _, problems = validate(read_yaml(str(bench)), str(bench))
    text = "\n".join(problems)
    for expected in (
        "protocol.segmnt_len: unknown key; did you mean 'segment_len'",
        "protocol.reset: must be document or never",
        "protocol.context_len: must be an integer >= 1",
        "methods[0]: unknown method 'nonee'",
        "methods[1].lr: unknown parameter of method 'none'",
        "models[1]: unknown model 'no-such-model'",
        "dtype: must be one of",
    ):
        assert expected in text, text
    res = cli("validate", str(bench))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == len(problems) + 1


def test_grids_expand_to_cells(tmp_path, corpus):
    from tta_bench.run.config import expand, load

    plugins = tmp_path / "p"
    plugins.mkdir()
    (plugins / "uniform.py").write_text(UNIFORM_PLUGIN, encoding="utf-8")
    bench = write_bench(
        tmp_path,
        corpus,
        plugins=[str(plugins)],
        seeds=[0, 1],
        methods=["none", {"name": "uniform-test", "adapt_flops_per_token": ["1e-3", 2, 3.5]}],
    )
    cfg = load(str(bench))
    cells = expand(cfg, "cpu")
    assert len(cells) == 2 * (1 + 3)
    flops = sorted(c.method["params"]["adapt_flops_per_token"] for c in cells if c.method["name"] == "uniform-test")
    assert flops == [0.001, 0.001, 2.0, 2.0, 3.5, 3.5]  # YAML's '1e-3' string coerced to float
    assert len({c.cell_id for c in cells}) == len(cells)


def _error_cases(tmp_path, corpus):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("models: [tiny\nmethods: none: x\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return {
        "unknown method": (write_bench(tmp_path / "m", corpus, methods=["nonee"]), "did you mean 'none'"),
        "unknown task": (write_bench(tmp_path / "t", corpus, tasks=["wikitxt-2"]), "did you mean 'wikitext-2'"),
        "unknown model": (write_bench(tmp_path / "o", corpus, models=["tinyy"]), "did you mean 'tiny'"),
        "misspelt key": (write_bench(tmp_path / "k", corpus, protocl={"segment_len": 4}), "did you mean 'protocol'"),
        "negative segment_len": (
            write_bench(tmp_path / "s", corpus, protocol={"segment_len": -4}),
            "segment_len: must be a positive integer",
        ),
        "missing data folder": (
            write_bench(tmp_path / "d", corpus, tasks=[{"name": "wikitext-2", "data_dir": str(tmp_path / "nowhere")}]),
            "data_dir",
        ),
        "unreadable yaml": (bad_yaml, "invalid YAML at line"),
        "unwritable output": (
            write_bench(tmp_path / "w", corpus, output_dir=str(a_file / "results")),
            "choose another output_dir",
        ),
        "unwritable output (read-only fs)": (
            write_bench(tmp_path / "r", corpus, output_dir="/proc/tta_bench_results"),
            "choose another output_dir",
        ),
    }


def test_each_user_error_is_one_line_naming_the_fix_and_writes_nothing(tmp_path, corpus):
    for sub in "mtoksdwr":
        (tmp_path / sub).mkdir()
    for name, (bench, expected) in _error_cases(tmp_path, corpus).items():
        before = sorted(p for p in tmp_path.rglob("*"))
        res = cli("run", str(bench))
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, (name, res.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (name, res.stderr)
        assert "Traceback" not in res.stderr + res.stdout
        assert sorted(p for p in tmp_path.rglob("*")) == before, f"{name}: wrote files"
