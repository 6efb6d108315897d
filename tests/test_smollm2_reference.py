"""Slow acceptance test on the real model: harness `none` equals an independent transformers loop."""

import subprocess
import sys

import pytest

from tests.conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (SHARED_DATA / "wikitext-2" / "test.txt").exists(), reason="needs ../shared/data")
def test_none_matches_independent_loop_on_smollm2():
    pytest.importorskip("gguf")
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "reference_none.py"), "--tokens", "20000"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "token counts equal" in res.stdout
