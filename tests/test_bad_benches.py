"""Every bench file under tests/bad_benches/ is refused by `validate` and by `run`: a non-zero exit, at
most 3 lines that name the problem (the `# expect:` line of the file), no traceback, and nothing
written to the results folder. A file marked `# run-time` holds a problem only a loaded model shows
(its window, its tokenizer's runs): `validate` passes it, and `run` refuses it before any compute."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED_DATA
from tta_bench.cli import main

BAD = REPO / "tests" / "bad_benches"
FILES = sorted(BAD.glob("*.yaml"))
WORDS = (
    "the model adapts to each document while it scores every token and learns from what it has seen before"
    " the next segment arrives with new words about rivers mountains cities and the people who live there"
).split()


def _text(seed: int, n: int) -> str:
    import random

    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(n // 10)) + "\n"


@pytest.fixture(autouse=True)
def _forget_bad_plugins():
    """The registry lives as long as the process: drop what these plugins registered, so that later
    tests (which check every registered method) never meet them."""
    from tta_bench.api import registry

    yield
    for reg in registry.REGISTRIES.values():
        for key in [k for k, e in reg.entries.items() if "bad_benches" in e.source]:
            del reg.entries[key]
    registry._scanned.difference_update({p for p in registry._scanned if "bad_benches" in p})


@pytest.fixture()
def folder(tmp_path):
    test = _text(0, 400)
    (tmp_path / "test.txt").write_text(test)
    (tmp_path / "train.txt").write_text(_text(1, 400))
    (tmp_path / "copy.txt").write_text(test)
    words = test.split()
    (tmp_path / "quote.txt").write_text(_text(2, 200) + " ".join(words[100:140]) + "\n" + _text(3, 200))
    (tmp_path / "bytes.txt").write_text(_text(4, 200) + " ".join(words[100:108]) + "\n")  # 8 words, over 32 bytes
    shutil.copy(SHARED_DATA / "wikitext-2" / "test.txt", tmp_path / "wikitext-test-copy.txt")
    return tmp_path


def test_there_are_at_least_40_bad_bench_files():
    assert len(FILES) >= 40


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_a_bad_bench_is_refused_in_one_line(path, folder, capsys, monkeypatch):
    text = path.read_text().replace("{tmp}", str(folder)).replace("{data}", str(SHARED_DATA))
    expect = text.splitlines()[0].removeprefix("# expect: ")
    run_time = text.splitlines()[1].startswith("# run-time")  # validate cannot see it: no model is loaded
    bench = folder / path.name
    bench.write_text(text)
    monkeypatch.chdir(folder)
    (folder / "plugins").symlink_to(BAD / "plugins")
    for command in ("run",) if run_time else ("validate", "run"):
        rc = main([command, str(bench)])
        out, err = capsys.readouterr()
        lines = [ln for ln in (out + err).splitlines() if ln.strip() and not ln.startswith("imported plugin code")]
        assert rc != 0, (command, out, err)
        assert "Traceback" not in out + err
        assert expect in out + err, (command, out + err)
        assert len(lines) <= 3, (command, lines)
        assert not (folder / "out").exists() and not Path(folder / "results").exists()
