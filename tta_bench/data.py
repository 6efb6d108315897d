"""Documents, tokenized streams and the Task base class."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import TTABenchError


@dataclass
class Document:
    title: str
    text: str


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


def tokenize(docs: list[Document], tokenizer, task: str, split: str,
             limit_docs: int | None = None, limit_tokens: int | None = None, doc_tokens: int | None = None) -> Stream:
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


class Task:
    """A source of documents for named splits.

    Subclasses set `splits` and implement `documents(split)`; `problem(split)` reports missing data
    before anything runs. `prepare_split(evaluated)` names the split `prepare` may see: never the
    evaluated one."""

    splits: tuple[str, ...] = ("train", "valid", "test")

    @dataclasses.dataclass
    class Params:  # a task's settings in a bench file, typed as a method's are
        pass

    def __init__(self, **params):
        typed, problems = self.make_params(params, "task")
        if problems:
            raise TTABenchError(problems[0])
        self.cfg = dataclasses.asdict(typed)

    @classmethod
    def make_params(cls, values: dict, where: str):
        from .params import make_params

        return make_params(cls.Params, values, where, f"task '{cls.registry_name}'")

    def available_splits(self) -> tuple[str, ...]:
        return self.splits

    def prepare_split(self, evaluated: str) -> str | None:
        avail = self.available_splits()
        for candidate in ("train", "valid", "test"):
            if candidate in avail and candidate != evaluated:
                return candidate
        return None

    def problem(self, split: str) -> str | None:
        return None

    def is_local(self, split: str) -> bool:
        """Whether `split` is read from local files (validate compares those by content; a download waits for `run`)."""
        return True

    def documents(self, split: str) -> list[Document]:
        raise NotImplementedError


def default_data_roots() -> list[Path]:
    """$TTA_BENCH_DATA, then ../shared/data beside this checkout or the working directory."""
    roots = []
    if os.environ.get("TTA_BENCH_DATA"):
        roots.append(Path(os.environ["TTA_BENCH_DATA"]).expanduser())
    repo = Path(__file__).resolve().parent.parent
    for base in (repo, Path.cwd()):
        cand = (base / ".." / "shared" / "data").resolve()
        if cand not in roots:
            roots.append(cand)
    return roots


def cache_dir() -> Path:
    """Where loaded models and prepared state are cached: $TTA_BENCH_CACHE, else ~/.cache/tta_bench."""
    return Path(os.environ.get("TTA_BENCH_CACHE", Path.home() / ".cache" / "tta_bench"))
