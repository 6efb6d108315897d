"""Split separation by content (SPEC 2): nothing `prepare` receives may share a document, or a run of
RUN tokens, with the evaluated stream. Checked before any compute:

- `validate` (no model loaded): the files each split reads, whole documents, and runs of RUN
  whitespace words (a stronger overlap than RUN tokens, seen without a tokenizer);
- `run`: runs of RUN tokens of the model's own tokenizer, against the whole prepare split and
  against what a setting brings in itself (a given checkpoint's recorded training data).

Runs are compared as 64-bit polynomial hashes of every window of RUN ids within a document."""

from __future__ import annotations

import hashlib
import os
import sys
from contextlib import contextmanager

import numpy as np

from tta_bench.api.errors import TTABenchError

RUN = 32


def run_hashes(ids, k: int = RUN) -> np.ndarray:
    """The hash of every window of k ids (none when there are fewer than k)."""
    a = np.asarray(ids, dtype=np.uint64)
    if len(a) < k:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        powers = np.uint64(1_000_003) ** np.arange(k, dtype=np.uint64)  # wraps mod 2^64
        return (np.lib.stride_tricks.sliding_window_view(a, k) * powers).sum(1, dtype=np.uint64)


def stream_runs(docs, k: int = RUN) -> np.ndarray:
    """Sorted unique run hashes of documents given as id lists (runs never cross a document boundary)."""
    parts = [run_hashes(ids, k) for ids in docs]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def contains(sorted_runs: np.ndarray, runs: np.ndarray) -> np.ndarray:
    """Which of `runs` occur in `sorted_runs` (sorted, unique): a binary search each."""
    if len(sorted_runs) == 0:
        return np.zeros(len(runs), dtype=bool)
    idx = np.minimum(np.searchsorted(sorted_runs, runs), len(sorted_runs) - 1)
    return sorted_runs[idx] == runs


def doc_hash(ids) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def first_overlap(prepared_runs: np.ndarray, evaluated_docs, prepared_docs=None) -> tuple[int, int | None] | None:
    """(evaluated document index, position of the first shared run, or None for a whole shared
    document), or None when the two share nothing."""
    whole = {doc_hash(ids) for ids in prepared_docs or [] if len(ids)}
    for i, ids in enumerate(evaluated_docs):
        if len(ids) and doc_hash(ids) in whole:
            return i, None
        hit = np.nonzero(contains(prepared_runs, run_hashes(ids)))[0]
        if len(hit):
            return i, int(hit[0])
    return None


# -- files a block of code opens ----------------------------------------------------------------
_OPENED: list | None = None
_HOOKED = False


def _audit(event, args):
    if _OPENED is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.abspath(os.fsdecode(args[0])))


@contextmanager
def opened_files():
    """Record the path of every file this process opens inside the block (audit hooks cannot be
    removed, so one is installed once and idles outside the block)."""
    global _OPENED, _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True
    outer, _OPENED = _OPENED, []
    seen = _OPENED
    try:
        yield seen
    finally:
        if outer is not None:
            outer.extend(seen)
        _OPENED = outer


def real_paths(paths) -> set[str]:
    return {os.path.realpath(p) for p in paths}


def read_split(task, split: str) -> tuple[list, set[str]]:
    """The split's documents, and the data files reading them opened (modules imported on the way
    are not data)."""
    with opened_files() as seen:
        docs = task.split_documents(split)
    return docs, {p for p in real_paths(seen) if not p.endswith((".py", ".pyc", ".so"))}


def _words(text: str, vocab: dict) -> list[int]:
    return [vocab.setdefault(w, len(vocab)) for w in text.split()]


def _describe(where, hit, ev_titles, unit) -> str:
    doc, pos = hit
    title = ev_titles[doc] if doc < len(ev_titles) else f"#{doc}"
    if pos is None:
        return f"{where} holds the evaluated document '{title}'"
    return f"{where} shares a run of {RUN} {unit} with the evaluated document '{title}' ({unit[:-1]} {pos})"


_VOCAB: dict = {}  # word -> id, one numbering for every check in this process, so a split's word runs can be kept
_PREPARED_WORDS: dict = {}  # prepare split text hash -> (its documents as word ids, their runs)


def check_task_text(task, split: str, prep: str | None, name: str) -> str | None:
    """validate's check of one task entry: the files the two splits read, their documents, and runs
    of RUN words. A problem, or None."""
    if prep is None:
        return None
    ev_docs, ev_files = read_split(task, split)
    prep_docs, prep_files = read_split(task, prep)
    # two ranges of one split's documents (valid[:4] tuning, valid[4:] prepare) read one file by design
    shared = [] if _ranges_of_one_split(split, prep) else sorted(ev_files & prep_files)
    if shared:
        return (
            f"{name}: the prepare split '{prep}' and the evaluated split '{split}' both read {shared[0]};"
            " point them at different files (SPEC 2)"
        )
    key = hashlib.sha256("\x00".join(d.text for d in prep_docs).encode()).hexdigest()
    if key not in _PREPARED_WORDS:  # two task entries that prepare on the same text read its words once
        ids = [_words(d.text, _VOCAB) for d in prep_docs]
        _PREPARED_WORDS[key] = (ids, stream_runs(ids))
    prep_ids, prep_runs = _PREPARED_WORDS[key]
    hit = first_overlap(prep_runs, [_words(d.text, _VOCAB) for d in ev_docs], prep_ids)
    if hit is None:
        return None
    return (
        f"{name}: "
        + _describe(f"the prepare split '{prep}'", hit, [d.title for d in ev_docs], "words")
        + f" of the evaluated split '{split}'; point them at disjoint text (SPEC 2)"
    )


def _ranges_of_one_split(a: str, b: str) -> bool:
    from tta_bench.api.task import parse_split

    (base_a, part_a), (base_b, part_b) = parse_split(a), parse_split(b)
    return base_a == base_b and part_a is not None and part_b is not None


_PREPARED_RUNS: dict[str, np.ndarray] = {}  # stream fingerprint -> its runs: every cell of a task shares them


def check_streams(evaluated, prepared, given: list[tuple[str, np.ndarray]] = ()) -> None:
    """run's check, in tokens: raises one line naming both sides on the first overlap. `given`:
    (what, run hashes) of data a setting brings in itself."""
    ev_docs = [d.ids for d in evaluated.docs]
    titles = [d.title for d in evaluated.docs]
    sides = []
    if prepared is not None:
        prep_docs = [d.ids for d in prepared.docs]
        if prepared.fingerprint not in _PREPARED_RUNS:
            _PREPARED_RUNS.clear()  # one prepare split at a time is what a run goes through
            _PREPARED_RUNS[prepared.fingerprint] = stream_runs(prep_docs)
        sides.append(
            (f"the prepare split {prepared.task}:{prepared.split}", _PREPARED_RUNS[prepared.fingerprint], prep_docs)
        )
    sides += [(what, runs, None) for what, runs in given]
    for what, runs, docs in sides:
        hit = first_overlap(runs, ev_docs, docs)
        if hit is not None:
            raise TTABenchError(
                _describe(what, hit, titles, "tokens")
                + f" of {evaluated.task}:{evaluated.split}; prepare must not see the evaluated text (SPEC 2)"
            )
