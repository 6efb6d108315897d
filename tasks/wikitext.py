"""WikiText-2 and WikiText-103 (Merity et al. 2016), tokenized ("non-raw") versions.

Offline: a folder with {train,valid,test}.txt (or the original wiki.{train,valid,test}.tokens),
given as `data_dir`, or `<root>/wikitext-2` (-103) under $TTA_BENCH_DATA or ../shared/data.
Online: the Hugging Face dataset `wikitext` (needs `pip install datasets`).
Articles start at lines ` = Title = ` (one '=' each side); they are the documents.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tta_bench.api.task import Document, Task, default_data_roots
from tta_bench.api.errors import TTABenchError
from tta_bench.api.registry import register_task

TITLE = re.compile(r"^ = [^=].* = $")
FILE_NAMES = {s: (f"{s}.txt", f"wiki.{s}.tokens") for s in ("train", "valid", "test")}


def split_articles(text: str) -> list[Document]:
    """Cut at title lines; text before the first title stays with the first article, so the
    documents together are exactly the file."""
    docs: list[Document] = []
    lines: list[str] = []
    title = ""
    for line in text.splitlines(keepends=True):
        if TITLE.match(line.rstrip("\n")):
            if title:
                docs.append(Document(title, "".join(lines)))
                lines = []
            title = line.strip().strip("=").strip()
        lines.append(line)
    if lines:
        docs.append(Document(title or "(untitled)", "".join(lines)))
    return docs


class _WikiText(Task):
    dataset_config = ""
    folder = ""

    @dataclass
    class Params:
        data_dir: str | None = None  # a folder with {train,valid,test}.txt; null: the default data roots
        online: bool | Literal["auto"] = "auto"  # download with `datasets` when no local copy is found

    def _folder(self) -> Path | None:
        if self.cfg["data_dir"]:
            return Path(self.cfg["data_dir"]).expanduser()
        for root in default_data_roots():
            if (root / self.folder).is_dir():
                return root / self.folder
        return None

    def _file(self, split: str) -> Path | None:
        folder = self._folder()
        if folder is None:
            return None
        for name in FILE_NAMES[split]:
            if (folder / name).is_file():
                return folder / name
        return None

    def _online(self) -> bool:
        if self.cfg["online"] is True:
            return True
        if self.cfg["online"] is False:
            return False
        import importlib.util

        return importlib.util.find_spec("datasets") is not None

    def available_splits(self):
        if self._online() and self._folder() is None:
            return self.splits
        return tuple(s for s in self.splits if self._file(s) is not None)

    def is_local(self, split: str) -> bool:
        return self._file(split) is not None

    def problem(self, split: str) -> str | None:
        if split not in self.splits:
            return f"{self.registry_name} has no split '{split}'; use one of {', '.join(self.splits)}"
        if self._file(split) is not None:
            return None
        folder = self._folder()
        if self.cfg["data_dir"] and not Path(self.cfg["data_dir"]).expanduser().is_dir():
            return (
                f"{self.registry_name}: data_dir {self.cfg['data_dir']} does not exist; point `data_dir` at a folder"
                f" with {FILE_NAMES[split][0]}"
            )
        if folder is None and self._online():
            return None
        looked = [str(folder)] if folder else [str(r / self.folder) for r in default_data_roots()]
        return (
            f"{self.registry_name} {split} split not found (looked in {', '.join(looked)}); set `data_dir` or"
            f" $TTA_BENCH_DATA to a folder holding {self.folder}/{FILE_NAMES[split][0]}, or `pip install datasets` to download it"
        )

    def documents(self, split: str) -> list[Document]:
        problem = self.problem(split)
        if problem:
            raise TTABenchError(problem)
        path = self._file(split)
        if path is not None:
            return split_articles(path.read_text(encoding="utf-8"))
        import datasets

        name = {"valid": "validation"}.get(split, split)
        rows = datasets.load_dataset("wikitext", self.dataset_config, split=name)["text"]
        return split_articles("".join(rows))


@register_task("wikitext-2")
class WikiText2(_WikiText):
    """WikiText-2 (tokenized; 245,569 word units in test). Offline copy has no train split: prepare uses valid."""

    dataset_config = "wikitext-2-v1"
    folder = "wikitext-2"


@register_task("wikitext-103")
class WikiText103(_WikiText):
    """WikiText-103 (tokenized; same valid/test as WikiText-2's articles, 103M-token train split)."""

    dataset_config = "wikitext-103-v1"
    folder = "wikitext-103"
