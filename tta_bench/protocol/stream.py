"""Tokenized streams: one task split as token ids, cut into documents, with the counts the metrics need."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from tta_bench.api.task import Document


@dataclass
class TokenizedDoc:
    title: str
    ids: list[int]
    n_bytes: int  # UTF-8 bytes of the text these tokens cover
    n_words: int  # whitespace words plus one per line (WikiText convention)


def count_words(text: str) -> int:
    return len(text.split()) + text.count("\n")


@dataclass
class Stream:
    """One task split as token ids, cut into documents."""

    task: str
    split: str
    docs: list[TokenizedDoc]
    fingerprint: str = ""
    cut: bool = False  # the last document was cut short by a token limit

    @property
    def n_tokens(self) -> int:
        return sum(len(d.ids) for d in self.docs)


def tokenize(
    docs: list[Document],
    tokenizer,
    task: str,
    split: str,
    limit_docs: int | None = None,
    limit_tokens: int | None = None,
    doc_tokens: int | None = None,
) -> Stream:
    """Tokenize documents in order, keeping boundaries; cut deterministically at the limits
    (`doc_tokens`: each document's first tokens only, so a short prefix still spans many documents)."""
    out: list[TokenizedDoc] = []
    total, cut = 0, False
    h = hashlib.sha256()
    for doc in docs[:limit_docs] if limit_docs else docs:
        ids, ends = tokenizer.encode(doc.text)
        if not ids:
            continue
        text = doc.text
        if doc_tokens is not None and len(ids) > doc_tokens:
            ids, text = ids[:doc_tokens], text[: ends[doc_tokens - 1]]
        if limit_tokens is not None and total + len(ids) > limit_tokens:
            keep = limit_tokens - total
            ids, text, cut = ids[:keep], text[: ends[keep - 1]], True
        out.append(TokenizedDoc(doc.title, ids, len(text.encode("utf-8")), count_words(text)))
        h.update(repr((doc.title, ids)).encode())
        total += len(ids)
        if limit_tokens is not None and total >= limit_tokens:
            break
    return Stream(task, split, out, h.hexdigest()[:16], cut)
