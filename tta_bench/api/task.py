"""The Task base class: a source of documents for named splits (what a task plugin subclasses), and
where local data is looked for."""

from __future__ import annotations

import dataclasses
import os
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
