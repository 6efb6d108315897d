"""Metrics (SPEC 4) and tasks against closed forms and the data's documented counts."""
import math

import numpy as np
import pytest

from tests.conftest import SHARED_DATA
from tta_bench.data import Document, count_words, tokenize
from tta_bench.lm import ByteTokenizer
from tta_bench.metrics import bootstrap_ci, summarize
from tta_bench.registry import get


def test_summary_closed_form():
    m = summarize(nll=100.0, tokens=50, n_bytes=200, words=40)
    assert m["token_ppl"] == pytest.approx(math.exp(2.0))
    assert m["word_ppl"] == pytest.approx(math.exp(2.5))
    assert m["bits_per_byte"] == pytest.approx(100.0 / (math.log(2) * 200))


def test_bootstrap_interval_brackets_the_estimate_and_is_degenerate_for_identical_documents():
    rng = np.random.default_rng(1)
    nll, tok = rng.uniform(50, 150, 40), rng.integers(20, 60, 40)
    ci = bootstrap_ci(nll, tok, tok * 4, tok, n_boot=500)
    point = math.exp(nll.sum() / tok.sum())
    assert ci["token_ppl"][0] < point < ci["token_ppl"][1]
    same = bootstrap_ci([10.0] * 5, [5] * 5, [20] * 5, [4] * 5)
    assert same["token_ppl"] == pytest.approx([math.exp(2.0)] * 2)


@pytest.mark.skipif(not (SHARED_DATA / "wikitext-2" / "test.txt").exists(), reason="needs ../shared/data")
def test_wikitext2_documents_reassemble_the_file_and_match_the_canonical_word_count():
    path = SHARED_DATA / "wikitext-2" / "test.txt"
    docs = get("task", "wikitext-2")().documents("test")
    assert "".join(d.text for d in docs) == path.read_text(encoding="utf-8")
    assert sum(count_words(d.text) for d in docs) == 245_569
    assert len(docs) == 62 and docs[0].title == "Robert <unk>"
    # headings inside an article do not start documents
    assert all(" = = " not in d.text.splitlines(keepends=True)[0] for d in docs)


def test_limits_cut_deterministically_with_matching_bytes_and_words():
    docs = [Document("a", "héllo wörld\nfoo bar\n"), Document("b", "second doc\n")]
    tok = ByteTokenizer()
    full = tokenize(docs, tok, "t", "test")
    assert [len(d.ids) for d in full.docs] == [len(d.text.encode()) for d in docs]
    cut = tokenize(docs, tok, "t", "test", limit_tokens=8)
    assert len(cut.docs) == 1 and len(cut.docs[0].ids) == 8
    # 8 bytes of "héllo wörld": 'h' 'é'(2) 'l' 'l' 'o' ' ' 'w' -> text "héllo w"
    assert cut.docs[0].n_bytes == 8 and cut.docs[0].n_words == 2
    assert tokenize(docs, tok, "t", "test", limit_docs=1).n_tokens == len(docs[0].text.encode())
    assert cut.fingerprint == tokenize(docs, tok, "t", "test", limit_tokens=8).fingerprint != full.fingerprint


def test_text_task_splits_files_by_pattern(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("CHAPTER 1\none\nCHAPTER 2\ntwo\nthree\n", encoding="utf-8")
    task = get("task", "text")(splits={"test": str(f)}, doc_pattern=r"^CHAPTER")
    docs = task.documents("test")
    assert [d.text for d in docs] == ["CHAPTER 1\none\n", "CHAPTER 2\ntwo\nthree\n"]
    assert task.prepare_split("test") is None
    assert "does not exist" in get("task", "text")(splits={"test": str(tmp_path / "nope")}).problem("test")
