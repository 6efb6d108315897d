"""Tokenized streams: one task split as token ids, cut into documents, with the counts the metrics need."""

from __future__ import annotations

import hashlib
import random
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
    draw: dict | None = None  # which documents were chosen, and among how many (Draw)

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
    draw: "Draw | None" = None,
) -> Stream:
    """Tokenize documents in order, keeping boundaries; cut deterministically at the limits
    (`doc_tokens`: each document's first tokens only, so a short prefix still spans many documents).
    With a `draw`, the documents are first chosen among those long enough (see Draw), in stream order."""
    if draw is not None:
        docs, draw_record = draw.choose(docs, tokenizer, limit_docs)
        limit_docs = None
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
    # the fingerprint hashes the documents chosen: two draws of the same documents are one stream
    return Stream(task, split, out, h.hexdigest()[:16], cut, draw_record if draw is not None else None)


@dataclass(frozen=True)
class Draw:
    """Which documents a stream holds: those of at least `min_tokens` tokens (all of them: 1), then
    `random`ly `docs` of them (seeded by `seed`) or the `first` ones, kept in stream order.

    A study's documents are a sample, not the head of a file (SPEC 4): a paired interval over the first
    few articles describes those articles, a random draw describes the split. The record of the draw
    (the indices chosen among how many were long enough) goes into every cell."""

    how: str = "first"  # first | random
    min_tokens: int = 1
    seed: int = 0

    def choose(self, docs: list[Document], tokenizer, n: int | None) -> tuple[list[Document], dict]:
        lengths = [len(tokenizer.encode(d.text)[0]) for d in docs]
        eligible = [i for i, n_tok in enumerate(lengths) if n_tok >= self.min_tokens]
        if self.how == "random":
            chosen = sorted(random.Random(self.seed).sample(eligible, min(n or len(eligible), len(eligible))))
        else:
            chosen = eligible[:n] if n else eligible
        record = {
            "how": self.how,
            "seed": self.seed if self.how == "random" else None,
            "min_doc_tokens": self.min_tokens,
            "documents_in_split": len(docs),
            "long_enough": len(eligible),
            "asked": n,
            "chosen": chosen,
        }
        return [docs[i] for i in chosen], record
