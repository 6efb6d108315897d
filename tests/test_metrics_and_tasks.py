"""Metrics (SPEC 4) and tasks against closed forms and the data's documented counts."""

import math

import numpy as np
import pytest

from tests.conftest import SHARED_DATA
from tta_bench.api.task import Document
from tta_bench.protocol.stream import count_words, tokenize
from tta_bench.protocol.lm import ByteTokenizer
from tta_bench.protocol.metrics import document_ci, paired_difference, summarize
from tta_bench.api.registry import get


def test_summary_closed_form():
    m = summarize(nll=100.0, tokens=50, n_bytes=200, words=40)
    assert m["token_ppl"] == pytest.approx(math.exp(2.0))
    assert m["word_ppl"] == pytest.approx(math.exp(2.5))
    assert m["bits_per_byte"] == pytest.approx(100.0 / (math.log(2) * 200))


def test_document_interval_brackets_the_estimate_and_is_degenerate_for_identical_documents():
    rng = np.random.default_rng(1)
    nll, tok = rng.uniform(50, 150, 40), rng.integers(20, 60, 40)
    ci = document_ci(nll, tok, tok * 4, tok)
    point = math.exp(nll.sum() / tok.sum())
    assert ci["token_ppl"][0] < point < ci["token_ppl"][1]
    same = document_ci([10.0] * 5, [5] * 5, [20] * 5, [4] * 5)
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


def test_doc_tokens_keeps_the_first_tokens_of_every_document():
    docs = [Document("a", "héllo wörld\nfoo bar\n"), Document("b", "second doc\n"), Document("c", "xy")]
    got = tokenize(docs, ByteTokenizer(), "t", "test", doc_tokens=8, limit_tokens=18)
    assert [len(d.ids) for d in got.docs] == [8, 8, 2]
    assert got.docs[0].n_bytes == 8 and got.docs[0].n_words == 2  # "héllo w", as limit_tokens cuts
    assert got.docs[1].ids == list("second d".encode())


def test_text_task_borrows_another_tasks_split(tmp_path):
    if not (SHARED_DATA / "wikitext-2" / "valid.txt").is_file():
        pytest.skip("needs ../shared/data/wikitext-2")
    text = get("task", "text")(splits={"test": str(tmp_path), "valid": "task:wikitext-2:valid"})
    wiki = get("task", "wikitext-2")().documents("valid")
    assert text.problem("valid") is None and text.is_local("valid")
    assert [(d.title, d.text) for d in text.documents("valid")] == [(d.title, d.text) for d in wiki]
    assert "unknown task 'nope'" in get("task", "text")(splits={"valid": "task:nope:valid"}).problem("valid")
    assert "write task:<name>:<split>" in get("task", "text")(splits={"valid": "task:valid"}).problem("valid")


def test_text_task_splits_files_by_pattern(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("CHAPTER 1\none\nCHAPTER 2\ntwo\nthree\n", encoding="utf-8")
    task = get("task", "text")(splits={"test": str(f)}, doc_pattern=r"^CHAPTER")
    docs = task.documents("test")
    assert [d.text for d in docs] == ["CHAPTER 1\none\n", "CHAPTER 2\ntwo\nthree\n"]
    assert task.prepare_split("test") is None
    assert "does not exist" in get("task", "text")(splits={"test": str(tmp_path / "nope")}).problem("test")


def test_paired_difference_cancels_document_difficulty():
    # (its coverage, closed form and zero-width cases: tests/test_intervals.py)
    rng = np.random.default_rng(3)
    tokens = rng.integers(50, 500, 12).astype(float)
    hard = rng.uniform(2, 5, 12)  # per-token NLL of each document: the documents differ a lot
    ref = hard * tokens
    better = (hard - 0.05 + rng.normal(0, 0.01, 12)) * tokens  # about 0.05 nats per token better everywhere
    got = paired_difference(better, ref, tokens)
    point = math.exp(better.sum() / tokens.sum()) - math.exp(ref.sum() / tokens.sum())
    assert got["delta_ppl"] == pytest.approx(point) and got["ci95"][0] < point < got["ci95"][1] < 0
    assert got["delta_nll"] == pytest.approx((better - ref).sum() / tokens.sum())
    assert got["excludes_zero"] and got["nll_ci95"][1] < 0 and got["p"] < 1e-4
    # unpaired, the two cells' intervals overlap: document difficulty swamps the difference
    a, b = (document_ci(x, tokens, tokens, tokens)["token_ppl"] for x in (better, ref))
    assert a[1] > b[0]
    same = paired_difference(ref, ref, tokens)
    assert same["delta_ppl"] == 0 and same["ci95"] == [0, 0] and not same["excludes_zero"]
    assert paired_difference(ref, ref[:-1], tokens) is None
