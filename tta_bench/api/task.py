"""The Task base class: a source of documents for named splits (what a task plugin subclasses), and
where local data is looked for."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tta_bench._paths import REPO
from tta_bench.api.errors import TTABenchError


@dataclass
class Document:
    title: str
    text: str


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
        from tta_bench.api.params import make_params

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

    # -- a range of a split's documents, e.g. valid[:4] (tuning) beside valid[4:] (prepare) ------
    def split_documents(self, split: str) -> list[Document]:
        """`documents`, where `split` may name a range of a split's documents: `valid[4:]`."""
        base, part = parse_split(split)
        docs = self.documents(base)
        return docs if part is None else docs[part]

    def split_problem(self, split: str) -> str | None:
        """`problem`, for a split or a range of its documents."""
        try:
            base, _ = parse_split(split)
        except TTABenchError as e:
            return str(e)
        return self.problem(base)

    def split_is_local(self, split: str) -> bool:
        return self.is_local(parse_split(split)[0])


_RANGE = re.compile(r"^(?P<base>[^\[\]]+)\[(?P<start>\d*):(?P<stop>\d*)\]$")


def parse_split(split: str) -> tuple[str, slice | None]:
    """("valid", None) for `valid`; ("valid", slice(0, 4)) for `valid[:4]`: documents 0 to 3, so that
    tuning documents can be held out from the prepare split (`valid[4:]`) of the same file."""
    if "[" not in split:
        return split, None
    m = _RANGE.match(split)
    if m is None:
        raise TTABenchError(f"split {split!r}: write a range of documents as name[start:stop], e.g. valid[:4]")
    start, stop = (int(m[k]) if m[k] else None for k in ("start", "stop"))
    if start is not None and stop is not None and stop <= start:
        raise TTABenchError(f"split {split!r} holds no document; the stop must exceed the start")
    return m["base"], slice(start, stop)


def default_data_roots() -> list[Path]:
    """$TTA_BENCH_DATA, then ../shared/data beside this checkout or the working directory."""
    roots = []
    if os.environ.get("TTA_BENCH_DATA"):
        roots.append(Path(os.environ["TTA_BENCH_DATA"]).expanduser())
    for base in (REPO, Path.cwd()):
        cand = (base / ".." / "shared" / "data").resolve()
        if cand not in roots:
            roots.append(cand)
    return roots
