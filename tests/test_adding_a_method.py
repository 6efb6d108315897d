"""README's "Adding a method" is true as written: its worked example is what the protocol gives a
method, and its code, copied into a plugin folder alone, runs, passes `check` and is labelled as it
says (a static method a control, never TTA; a method that does not say which is refused)."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import REPO, cli, write_bench


def _section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return text.split("\n## Adding a method\n", 1)[1].split("\n## ", 1)[0]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", _section(), re.S | re.M)


def _token_ids(names: str) -> list[int]:
    """The example's token names as the tiny model's ids: t0..t9 "abcdefghij", u0..u2 "xyz", <s> BOS."""
    ids = {"<s>": 256, **{f"t{i}": 97 + i for i in range(10)}, **{f"u{i}": 120 + i for i in range(3)}}
    return [ids[n.strip()] for n in names.split(",")]


def test_the_worked_example_is_what_the_protocol_gives_a_method():
    """Every row of the INPUT table, under each reset policy, equals tta_bench.protocol.evaluate.segments."""
    from tta_bench.protocol.evaluate import Protocol, segments
    from tta_bench.protocol.lm import ByteTokenizer
    from tta_bench.protocol.stream import Stream, TokenizedDoc

    (example,) = _blocks("text")
    assert "segment_len: 4" in _section() and "context_len: 2" in _section()
    rows = re.findall(
        r"^\s*(?:INPUT)?\s+(both|document|never)\s+\[\[(.*?)\]\]\s+(\d+)\s+(\d+)\s+(\d+)\s+\[(.*?)\]", example, re.M
    )
    assert len(rows) == 5, example
    tok = ByteTokenizer()
    stream = Stream("x", "test", [TokenizedDoc(t, tok.encode(t)[0], len(t), 1) for t in ("abcdefghij", "xyz")])
    for reset in ("document", "never"):
        want = [
            (_token_ids(ids), int(n), int(doc), int(start), _token_ids(targets))
            for policy, ids, n, doc, start, targets in rows
            if policy in ("both", reset)
        ]
        got = [
            (seg.ids[0].tolist(), seg.n, seg.doc, seg.start, targets.tolist())
            for seg, targets, _ in segments(stream, Protocol(4, 2, reset), tok.bos_id)
        ]
        assert got == want, reset


def _plugins(tmp_path, code: str):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "readme_methods.py").write_text(code, encoding="utf-8")
    return folder


def test_the_readme_methods_run_pass_check_and_are_labelled_as_they_say(tmp_path, corpus):
    code = "\n\n".join(_blocks("python"))
    plugins = _plugins(tmp_path, code)
    bench = write_bench(tmp_path, corpus, plugins=[str(plugins)], methods=["none", "unigram-prior", "unigram-cache"])
    res = cli("run", str(bench), "--no-progress")
    assert res.returncode == 0, res.stdout + res.stderr
    cells = (tmp_path / "results" / "t" / "cells").glob("*.json")
    records = {r["label"]: r for r in (json.loads(p.read_text()) for p in cells)}
    assert records["unigram-prior"]["role"] == {"test_time": False, "control": None}
    assert records["unigram-cache"]["role"] == {
        "test_time": True,
        "control": {"method": "unigram-prior", "params": {"lam": 0.1, "prepare_tokens": 50_000}},
    }
    assert records["unigram-cache"]["costs"]["flops"]["mix.unigram"] > 0  # what the method reports is charged
    kinds = {r["method"]: r for r in json.loads((tmp_path / "results" / "t" / "leaderboard.json").read_text())}
    assert [kinds[m]["kind"] for m in ("none", "unigram-prior", "unigram-cache")] == ["base", "control", "TTA"]
    nll = {label: r["metrics"]["nll_sum"] for label, r in records.items()}
    assert nll["unigram-cache"] < nll["unigram-prior"] < nll["none"]  # the prior, and reading, both help
    (tmp_path / "check").mkdir()  # the README's two methods alone: `none` has its own checks
    only_readme = write_bench(
        tmp_path / "check", corpus, plugins=[str(plugins)], methods=["unigram-prior", "unigram-cache"]
    )
    checked = cli("check", str(only_readme), "--only-bench")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "2 setting(s) checked" in checked.stdout and "2 passed, 0 failed" in checked.stdout, checked.stdout


@pytest.mark.parametrize("hook", ["adapts_at_test_time", "score"])
def test_a_method_that_leaves_a_required_hook_out_is_refused_in_one_line(tmp_path, corpus, hook):
    """The static method of the README without its `adapts_at_test_time` (it would otherwise have been
    labelled TTA, and set only against `none`), or without `score`: `validate` names the file and the hook."""
    code = "\n\n".join(_blocks("python"))
    prior = code.split('@register_method("unigram-cache")')[0]
    decorated = (
        r"    @classmethod\n    def adapts_at_test_time.*?\n\n"
        if hook == "adapts_at_test_time"
        else r"    @torch.no_grad\(\)\n    def score.*?\n\n\n"
    )
    without, n = re.subn(decorated, "", prior, count=1, flags=re.S)
    assert n == 1 and f"def {hook}" not in without
    plugins = _plugins(tmp_path, without)
    bench = write_bench(tmp_path, corpus, plugins=[str(plugins)], methods=["unigram-prior"])
    res = cli("validate", str(bench))
    lines = [
        ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip() and not ln.startswith("imported plugin code")
    ]
    (problem,) = [ln for ln in lines if "does not implement" in ln]  # under validate's header line
    assert res.returncode == 2 and len(lines) <= 3, lines
    assert f"does not implement {hook}()" in problem and str(plugins / "readme_methods.py") in problem, lines
