"""Command-line overrides (run/overrides.py): `--set key=value` on a bench file, a bench from the lm-eval
style flags alone, an unknown key and a bad value; each path is checked against the resolved config
it records (the run folder's resolved-bench.yaml and each cell's provenance)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import write_bench
from tta_bench.api.errors import TTABenchError
from tta_bench.cli import main
from tta_bench.run import overrides, runner
from tta_bench.run.config import expand, read_yaml, validate

pytestmark = pytest.mark.usefixtures("one_thread")
RESOLVED = ("protocol", "limits", "models", "tasks", "methods", "device", "dtype", "seeds", "run", "output_dir")


def _cells(run_dir) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((run_dir / "cells").glob("*.json"))]


def _same_config(a, b) -> None:
    for key in RESOLVED:
        assert getattr(a, key) == getattr(b, key), key


def test_apply_sets_paths_items_and_every_item():
    raw = {"protocol": {"segment_len": 16}, "models": "tiny", "methods": ["none", {"name": "cache", "window": 9}]}
    out = overrides.apply(
        raw,
        [
            "protocol.segment_len=256",
            "limits.tokens=2000",  # a mapping the file does not have is created
            "methods.1.window=1e3",  # kept as YAML reads it (a string, as `window: 1e3` in a file)
            "methods.0.label=base",  # a bare name becomes its mapping
            "models.*.dtype=auto",  # a single entry written without its list
            "seeds=[0, 1]",
        ],
    )
    assert out == {
        "protocol": {"segment_len": 256},
        "limits": {"tokens": 2000},
        "models": [{"name": "tiny", "dtype": "auto"}],
        "methods": [{"name": "none", "label": "base"}, {"name": "cache", "window": "1e3"}],
        "seeds": [0, 1],
    }
    assert raw["protocol"] == {"segment_len": 16}  # the file's mapping is left as it was
    for bad, words in (
        ("methods.5.lr=1", "a list of 2; index it with 0 to 1"),
        ("protocol.segment_len.x=1", "protocol.segment_len is 16, not a mapping"),
        ("protocol.segment_len", "give KEY=VALUE"),
        ("seeds=[0,", "not valid YAML"),
    ):
        with pytest.raises(TTABenchError, match=words):
            overrides.apply(raw, [bad])


def test_file_plus_set_equals_the_same_values_written_in_the_file(tmp_path, corpus):
    bench = write_bench(tmp_path, corpus, methods=["none", {"name": "cache", "window": 64}])
    sets = ["protocol.segment_len=8", "limits.tokens=60", "methods.1.window=32", "methods.1.lam=2e-1"]
    run_dir = runner.run(str(bench), sets=tuple(sets), log=lambda *a: None)

    written = read_yaml(str(bench))  # the same values written into the file by hand
    written["protocol"]["segment_len"], written["limits"] = 8, {"tokens": 60}
    written["methods"][1].update(window=32, lam="2e-1")
    by_hand, problems = validate(written, str(bench))
    assert not problems
    _same_config(overrides.load(str(bench), sets), by_hand)

    cells = _cells(run_dir)
    assert sorted(c["cell_id"] for c in cells) == sorted(c.cell_id for c in expand(by_hand, "cpu"))
    for c in cells:  # resume keys: the cell ids are those of the file with the values in it
        assert c["config"]["protocol"]["segment_len"] == 8 and c["config"]["limits"]["tokens"] == 60
        assert c["stream"]["n_tokens"] == 60 and c["provenance"]["overrides"] == sets
    cache = next(c for c in cells if c["config"]["method"]["name"] == "cache")
    assert cache["resolved"]["method_params"]["window"] == 32 and cache["resolved"]["method_params"]["lam"] == 0.2
    record = yaml.safe_load((run_dir / overrides.RESOLVED_FILE).read_text())
    assert record["source"] == str(bench.resolve()) and record["overrides"] == sets
    assert record["bench"]["protocol"]["segment_len"] == 8 and record["resolved"]["limits"]["tokens"] == 60


def test_a_bench_from_flags_alone(tmp_path, corpus, capsys):
    task = json.dumps({"name": "text", "splits": corpus})
    out = tmp_path / "runs" / "quick"
    argv = ["--model", "tiny", "--task", task, "--method", "none", "--method", "{name: cache, window: 16}"]
    argv += ["--limit", "2", "--limit-tokens", "400", "--device", "cpu", "--output", str(out)]
    argv += ["--set", "protocol.segment_len=16", "--set", "progress=false"]
    assert main(["validate", *argv]) == 0
    assert "ok (2 cells" in capsys.readouterr().out
    assert main(["run", *argv]) == 0

    cells = _cells(out)
    docs = sorted((tmp_path / "corpus" / "test").glob("*.txt"))[:2]  # --limit 2: the first two documents
    assert len(cells) == 2 and {c["config"]["method"]["name"] for c in cells} == {"none", "cache"}
    for c in cells:
        assert c["config"]["limits"]["docs"] == 2 and c["config"]["limits"]["tokens"] == 400
        assert c["config"]["device"] == "cpu" and c["config"]["protocol"]["segment_len"] == 16
        assert c["stream"]["n_docs"] == 2 and c["stream"]["n_tokens"] < 400  # all of the two, uncut
        assert [d["bytes"] for d in c["per_doc"]] == [len(p.read_bytes()) for p in docs]
    record = yaml.safe_load((out / overrides.RESOLVED_FILE).read_text())
    assert record["source"] is None and record["resolved"]["output_dir"] == str(out.parent)
    assert record["overrides"] == cells[0]["provenance"]["overrides"]
    assert record["overrides"][:3] == [
        'models=["tiny"]',
        f"tasks=[{task}]",
        'methods=["none", {name: cache, window: 16}]',  # a mapping as it was typed
    ]
    assert record["bench"]["methods"] == ["none", {"name": "cache", "window": 16}]
    assert record["overrides"][-2:] == ["protocol.segment_len=16", "progress=false"]


def test_flags_without_a_bench_need_model_task_and_method(capsys):
    assert main(["validate", "--model", "tiny", "--method", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model, --task and --method" in err
    assert main(["validate", "--model", "tiny", "--task", "wikitext-2", "--method", "{name: cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the value is not valid YAML" in err


def test_an_unknown_key_is_one_line_with_did_you_mean(tmp_path, corpus, capsys):
    bench = write_bench(tmp_path, corpus)
    assert main(["run", str(bench), "--set", "protocol.segment_lenn=32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--set protocol.segment_lenn=32" in err
    assert "did you mean 'segment_len'" in err
    assert not (tmp_path / "results").exists()  # refused before anything ran
    assert main(["validate", str(bench), "--set", "protocl.reset=never", "--set", "methods.0.windw=3"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "did you mean 'protocol'" in lines[1] and "--set protocl.reset=never" in lines[1]
    assert "--set methods.0.windw=3" in lines[2] and "unknown parameter of method 'none'" in lines[2]


@pytest.mark.parametrize(
    "setting, words",
    [
        ("protocol.segment_len=abc", "protocol.segment_len: must be a positive integer, got 'abc'"),
        ("protocol.segment_len=1.5", "protocol.segment_len: must be a positive integer, got 1.5"),
        ("limits.tokens=-1", "limits.tokens: must be a positive integer or null, got -1"),
        ("protocol.reset=sometimes", "protocol.reset: must be document or never"),
        ("seeds=[1, 1]", "seeds: a seed is listed twice"),
    ],
)
def test_a_bad_value_is_refused_as_in_the_file(tmp_path, corpus, capsys, setting, words):
    bench = write_bench(tmp_path, corpus)
    key, _, value = setting.partition("=")
    in_file = read_yaml(str(bench))  # the value written into the file by hand
    *up, last = key.split(".")
    (in_file.setdefault(up[0], {}) if up else in_file)[last] = yaml.safe_load(value)
    assert any(words in p for p in validate(in_file, str(bench))[1])  # the file's own problem, word for word
    assert main(["run", str(bench), "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--set {setting}: {words}" in err
    assert not (tmp_path / "results").exists()
