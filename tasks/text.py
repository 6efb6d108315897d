"""Any local text: files or folders per split, one document per file or cut by a line pattern; a
split may also be another registered task's split (`task:wikitext-2:valid`), e.g. to prepare an
out-of-domain evaluation on the same text an in-domain one prepares on."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from pathlib import Path

from tta_bench.api.task import Document, Task
from tta_bench.api.errors import TTABenchError
from tta_bench.api.registry import get, register_task

BORROW = "task:"  # a split given as task:<name>:<split> is read from that task (its default settings)


@register_task("text")
class LocalText(Task):
    """Local text files: `splits: {test: path, train: path}`; a file or a folder of files per split, or task:<name>:<split>."""

    @dataclass
    class Params:
        splits: dict[str, str] = field(default_factory=dict)  # split name -> a file or folder
        glob: str = "*.txt"  # the files of a folder
        doc_pattern: str | None = None  # a regex: a line that matches starts a new document
        encoding: str = "utf-8"

        def problems(self) -> list[str]:
            out = []
            if self.doc_pattern is not None:
                try:
                    re.compile(self.doc_pattern)
                except re.error as e:
                    out.append(f"doc_pattern {self.doc_pattern!r} is not a valid regular expression ({e})")
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                out.append(f"encoding {self.encoding!r} is unknown; use e.g. utf-8 or latin-1")
            if not self.glob:
                out.append("glob must not be empty; e.g. *.txt")
            return out

    def available_splits(self):
        return tuple(self.cfg["splits"])

    def _borrowed(self, split: str):
        """(task object, its split) when `split` is given as task:<name>:<split>, else None."""
        ref = self.cfg["splits"][split]
        if not ref.startswith(BORROW):
            return None
        name, _, other = ref[len(BORROW) :].rpartition(":")
        if not name or not other or name == self.registry_name:
            raise TTABenchError(
                f"text task: split {split} is {ref!r}; write task:<name>:<split>, e.g. task:wikitext-2:valid"
            )
        return get("task", name)(), other

    def is_local(self, split: str) -> bool:
        borrowed = self._borrowed(split)
        return borrowed[0].split_is_local(borrowed[1]) if borrowed else True

    def _files(self, split: str) -> list[Path]:
        path = Path(self.cfg["splits"][split]).expanduser()
        return sorted(path.rglob(self.cfg["glob"])) if path.is_dir() else [path]

    def problem(self, split: str) -> str | None:
        if split not in self.cfg["splits"]:
            return (
                f"text task has no split '{split}'; map it to a file or folder under"
                f" `splits:` (have: {', '.join(self.cfg['splits']) or 'none'})"
            )
        try:
            borrowed = self._borrowed(split)
        except TTABenchError as e:
            return f"text task: split {split}: {e}"
        if borrowed:
            problem = borrowed[0].split_problem(borrowed[1])
            return f"text task: split {split} ({self.cfg['splits'][split]}): {problem}" if problem else None
        path = Path(self.cfg["splits"][split]).expanduser()
        if not path.exists():
            return f"text task: {split} path {path} does not exist; fix `splits.{split}`"
        if not self._files(split):
            return f"text task: no files matching {self.cfg['glob']} under {path}; fix `glob` or the path"
        return None

    def documents(self, split: str) -> list[Document]:
        problem = self.problem(split)
        if problem:
            raise TTABenchError(problem)
        borrowed = self._borrowed(split)
        if borrowed:
            return borrowed[0].split_documents(borrowed[1])
        docs = []
        pattern = re.compile(self.cfg["doc_pattern"]) if self.cfg["doc_pattern"] else None
        for f in self._files(split):
            text = f.read_text(encoding=self.cfg["encoding"])
            if pattern is None:
                docs.append(Document(f.name, text))
                continue
            start = 0
            lines = text.splitlines(keepends=True)
            offsets = [0]
            for line in lines:
                offsets.append(offsets[-1] + len(line))
            cuts = [offsets[i] for i, line in enumerate(lines) if pattern.search(line) and offsets[i] > 0]
            for cut in cuts + [len(text)]:
                part = text[start:cut]
                if part:
                    docs.append(Document(f"{f.name}:{part.splitlines()[0].strip()[:60]}", part))
                start = cut
        return docs
