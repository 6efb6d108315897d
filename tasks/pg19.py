"""PG-19 (Rae et al. 2020): books, one document each; long-range test of adaptation.

Online through the Hugging Face dataset `deepmind/pg19` (needs `pip install datasets`), streamed so
only the books a run uses are downloaded; offline from `data_dir` with {train,validation,test}/*.txt
(the layout of the original release)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tta_bench.api.task import Document, Task
from tta_bench.api.errors import TTABenchError
from tta_bench.api.registry import register_task


@register_task("pg19")
class PG19(Task):
    """PG-19 books (online via `datasets`, or a local copy in `data_dir`); prepare uses train."""

    @dataclass
    class Params:
        data_dir: str | None = None  # a local copy: {train,validation,test}/*.txt; null: download
        max_books: int | None = None  # the first N books of each split

        def problems(self) -> list[str]:
            return (
                []
                if self.max_books is None or self.max_books >= 1
                else [f"max_books must be >= 1, got {self.max_books}"]
            )

    _folders = {"train": "train", "valid": "validation", "test": "test"}

    def is_local(self, split: str) -> bool:
        return bool(self.cfg["data_dir"])

    def problem(self, split: str) -> str | None:
        if split not in self.splits:
            return f"pg19 has no split '{split}'; use one of {', '.join(self.splits)}"
        if self.cfg["data_dir"]:
            folder = Path(self.cfg["data_dir"]).expanduser() / self._folders[split]
            return (
                None
                if folder.is_dir()
                else f"pg19: {folder} does not exist; fix `data_dir` (needs {self._folders[split]}/*.txt)"
            )
        if importlib.util.find_spec("datasets") is None:
            return (
                "pg19 needs the `datasets` package to download it (pip install datasets), or a local copy in `data_dir`"
            )
        return None

    def documents(self, split: str) -> list[Document]:
        problem = self.problem(split)
        if problem:
            raise TTABenchError(problem)
        n = self.cfg["max_books"]
        if self.cfg["data_dir"]:
            files = sorted((Path(self.cfg["data_dir"]).expanduser() / self._folders[split]).glob("*.txt"))[:n]
            return [Document(f.stem, f.read_text(encoding="utf-8")) for f in files]
        import itertools

        import datasets

        rows = datasets.load_dataset("deepmind/pg19", split=self._folders[split], streaming=True)
        return [Document(r["short_book_title"], r["text"]) for r in itertools.islice(rows, n)]
