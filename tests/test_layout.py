"""The core is the harness: it names no method, imports no method's dependencies, has no import
circles and no long functions; every file of it, and of every method, is in the resume key of the
cells it serves; a method is one file or one package, found with no edit elsewhere."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from tests.conftest import REPO, cli, write_bench

CORE = REPO / "tta_bench"
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    """tta_bench/run/config.py -> tta_bench.run.config; a package's __init__.py is the package."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool, names: set[str]) -> set[str]:
    """The core modules an import statement brings in (`from tta_bench.run import cellrun` is the
    module tta_bench.run.cellrun; `from tta_bench.run.config import load` is tta_bench.run.config)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names} & names
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        here = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    found = {f"{base}.{a.name}" for a in node.names} & names
    return found or ({base} & names)


def _run_time_nodes(node: ast.AST):
    """`node` and every node under it that runs (function bodies included), skipping the body of
    `if TYPE_CHECKING:`: an import only a type checker reads makes no circle."""
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for stmt in child.orelse:
                yield from _run_time_nodes(stmt)
        else:
            yield from _run_time_nodes(child)


def _core_imports() -> dict[str, set[str]]:
    """module -> the core modules it imports, by dotted name (function-level imports count too)."""
    paths = {_module_name(p): p for p in CORE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        found = set()
        for node in _run_time_nodes(ast.parse(path.read_text())):
            found |= _imported(node, name, path.name == "__init__.py", set(paths))
        graph[name] = found - {name}
    return graph


def test_core_has_no_import_circle():
    graph = _core_imports()
    assert "tta_bench.run.config" in graph["tta_bench.run.runner"]  # the graph sees absolute imports
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            assert state.get(n) != "open", f"import circle: {' -> '.join(path + [m, n])}"
            if n not in state:
                visit(n, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert "tta_bench.run.runner" in graph["tta_bench.cli"]
    assert "tta_bench.protocol.models" not in graph["tta_bench.api.registry"]
    assert not any("tta_bench.run.runner" in graph[m] for m in graph if m.startswith("tta_bench.checks."))


def test_no_function_of_the_core_is_over_60_lines():
    """A long function does several things: split it (its nested functions count within it)."""
    long = []
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}: {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(long)


def test_core_names_no_method_and_imports_no_method_code():
    for path in CORE.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(faiss|tta_bench_methods)", text, re.M), path  # no method code
        for node in ast.walk(
            ast.parse(text)
        ):  # a particular method named in code ("cache" is too common a word to test)
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value in ("fwl", "fwl-dynamic-eval", "dynamic-eval", "knn-lm", "knn-cache")
            ):
                raise AssertionError(f"{path.relative_to(REPO)} names the method {node.value!r}")


# Run in a copy of the checkout: finished records for every built-in method's cell, then each file
# edited in turn (a comment appended), and what the worker says of the finished cells each time.
STALE_SCRIPT = """
import json, sys
from pathlib import Path

import tta_bench
from tta_bench.api.registry import REGISTRIES, discover
from tta_bench.results.records import SCHEMA, cell_path
from tta_bench.run.config import expand, load
from tta_bench.run.worker import Worker

root, bench, edits = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
discover()
sources = [Path(tta_bench.__file__)] + [Path(e.source) for e in REGISTRIES["method"].entries.values()]
assert all(p.resolve().is_relative_to(root) for p in sources), f"not the copy: {sources}"
cfg = load(bench)
cells = expand(cfg, "cpu")
worker = Worker(cfg, "cpu", log=lambda *a: None)
keys = worker.keys(cells)
for c in cells:  # a finished cell file (its results left empty) under the key it was computed with
    path = cell_path(cfg.run_dir, c.cell_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": SCHEMA, "cell_id": c.cell_id, "label": c.label, "config": c.as_dict(),
                                "resolved": {}, "stream": {}, "metrics": {}, "costs": {}, "status": "ok",
                                "resume_key": keys[c.cell_id]}))


def reported():
    lines = []
    worker.log = lines.append
    worker.todo(cells, worker.keys(cells))
    return dict(ln.strip().removeprefix("recomputing ").split(": ", 1) for ln in lines if "recomputing" in ln)


out = {"": reported()}
for rel in edits:
    path = root / rel
    text = path.read_text()
    path.write_text(text + "\\n# an edit\\n")
    try:
        out[rel] = reported()
    finally:
        path.write_text(text)
print(json.dumps(out))
"""


def _checkout_copy(folder: Path) -> tuple[Path, dict]:
    """tta_bench/, methods/, tasks/ and pyproject.toml copied, importable as the installed names (the
    editable install maps tta_bench_methods to this checkout: the copy's come first on the path)."""
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("tta_bench", "methods", "tasks"):
        shutil.copytree(REPO / name, folder / name, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", folder)
    (folder / "importable").mkdir()
    (folder / "importable" / "tta_bench_methods").symlink_to(folder / "methods")
    (folder / "importable" / "tta_bench_tasks").symlink_to(folder / "tasks")
    return folder, {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(folder / "importable")])}


def _edited_files() -> list[str]:
    """Every file of the core and of the methods (but methods/__init__.py, the folder's marker, which no
    method's code includes), and the text task's file."""
    methods = sorted(set((REPO / "methods").rglob("*.py")) - {REPO / "methods" / "__init__.py"})
    files = sorted(CORE.rglob("*.py")) + methods
    return [f.relative_to(REPO).as_posix() for f in files + [REPO / "tasks" / "text.py"]]


def _home(source: str) -> str:
    """methods/<package>/ or methods/<file>.py: what a method's code is, relative to the checkout."""
    rel = Path(source).resolve().relative_to(REPO / "methods").parts
    return f"methods/{rel[0]}" + ("/" if len(rel) > 1 else "")


def test_every_file_is_in_the_resume_key_of_the_cells_it_serves(tmp_path, corpus):
    """Editing any file of the harness (every package, tta_bench/ itself included) makes every finished
    cell stale; any file of a method package or a one-file method the cells of the methods registered
    there (and of those importing it), never a cell's harness or task key; `none.py` only `none`'s.
    In a copy of the checkout, each edit undone before the next."""
    from tta_bench.api.registry import REGISTRIES, discover

    discover()
    homes = {
        e.name: _home(e.source)
        for e in REGISTRIES["method"].entries.values()
        if Path(e.source).resolve().is_relative_to(REPO / "methods")
    }
    copy, env = _checkout_copy(tmp_path / "checkout")
    bench = write_bench(tmp_path, corpus, methods=sorted(homes), limits={"tokens": 64})
    edits = _edited_files()
    res = subprocess.run(
        [sys.executable, "-c", STALE_SCRIPT, str(copy), str(bench), json.dumps(edits)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    stale = json.loads(res.stdout.strip().splitlines()[-1])
    assert stale.pop("") == {}, "every cell is current before any edit"
    assert len(stale) == len(edits) and {"tta_bench/api/method.py", "methods/none.py"} <= set(stale)

    def because(what):
        return f"stale: the code of {what} changed since it was computed"

    every_cell = set(homes)  # default settings: each cell's label is its method's name
    for rel, reasons in stale.items():
        if rel.startswith("tta_bench/"):
            assert reasons == dict.fromkeys(every_cell, because("harness")), rel
        elif rel.startswith("tasks/"):
            assert reasons == dict.fromkeys(every_cell, because("task")), rel
        else:
            served = {m for m, home in homes.items() if rel.startswith(home)}
            assert reasons and served <= set(reasons), (rel, reasons)  # a module no method is keyed by: dead or unkeyed
            assert set(reasons.values()) == {because("method")}, rel
    assert set(stale["methods/none.py"]) == {"none"}


def test_methods_and_their_packages_are_found_without_a_list():
    from tta_bench.api.registry import REGISTRIES, discover

    discover()
    sources = {e.name: e.source for e in REGISTRIES["method"].entries.values()}
    assert sources["fwl"].endswith("methods/fwl/method.py") and sources["knn-lm"].endswith(
        "methods/retrieval/methods.py"
    )
    assert sources["dynamic-eval"].endswith("methods/dynamic_eval/method.py") and sources["none"].endswith(
        "methods/none.py"
    )


PLUGIN_FILE = '''
from dataclasses import dataclass
import math
import torch
from tta_bench import register_method
from tta_bench.api.method import Method


@register_method("uniform-file")
class Uniform(Method):
    """Every token equally likely."""

    @dataclass
    class Params:
        pass

    @classmethod
    def adapts_at_test_time(cls, params):
        return False

    def score(self, seg):
        return torch.full((seg.n, self.lm.vocab_size), -math.log(self.lm.vocab_size))
'''

PLUGIN_PACKAGE = {
    "__init__.py": '"""A method package: its math in one module, the method in another."""\n',
    "counts.py": '''
import torch


def add_one_counts(counts, targets):
    """Laplace-smoothed unigram counts of what has been read."""
    counts.index_add_(0, targets, torch.ones(len(targets), dtype=counts.dtype))
''',
    "method.py": '''
from dataclasses import dataclass
import torch
from tta_bench import register_method
from tta_bench.api.method import Method

from .counts import add_one_counts


@register_method("unigram-package")
class Unigram(Method):
    """A unigram model of the document read so far (add-one smoothing)."""

    @dataclass
    class Params:
        pass

    @classmethod
    def adapts_at_test_time(cls, params):
        return True

    def reset(self):
        self.counts = torch.ones(self.lm.vocab_size, dtype=torch.float64)

    def score(self, seg):
        return torch.log(self.counts / self.counts.sum()).float().expand(seg.n, -1)

    def adapt(self, seg):
        add_one_counts(self.counts, seg.targets)
''',
}


def test_a_one_file_method_and_a_method_package_register_and_run(tmp_path, corpus):
    """Each in a temporary folder given as `plugins:`: no edit anywhere else. The package's relative
    import works, and its numbers equal a closed form: uniform gives ppl = vocabulary size; the
    unigram cache's NLL is recomputed here by a plain loop."""
    import json
    import math

    plugins = tmp_path / "plugins"
    (plugins / "unigram").mkdir(parents=True)
    (plugins / "uniform.py").write_text(textwrap.dedent(PLUGIN_FILE))
    for name, text in PLUGIN_PACKAGE.items():
        (plugins / "unigram" / name).write_text(textwrap.dedent(text))
    bench = write_bench(tmp_path, corpus, plugins=[str(plugins)], methods=["uniform-file", "unigram-package"])
    listed = cli("list", "methods", "--plugins", str(plugins))
    assert "uniform-file" in listed.stdout and "unigram-package" in listed.stdout and "unigram model" in listed.stdout
    res = cli("run", str(bench), "--no-progress")
    assert res.returncode == 0, res.stderr
    recs = {
        r["label"]: r
        for r in (json.loads(p.read_text()) for p in (tmp_path / "results" / "t" / "cells").glob("*.json"))
    }
    assert abs(recs["uniform-file"]["metrics"]["token_ppl"] - 258) < 1e-6 * 258
    cfg = yaml.safe_load(bench.read_text())
    from tta_bench.protocol.lm import ByteTokenizer

    # the method counts a segment after scoring it, so counts are frozen within a segment
    want = 0.0
    seg = cfg["protocol"]["segment_len"]
    for f in sorted(Path(cfg["tasks"][0]["splits"]["test"]).glob("*.txt")):
        ids = ByteTokenizer().encode(f.read_text(encoding="utf-8"))[0]
        counts = [1.0] * 258
        for a in range(0, len(ids), seg):
            total = sum(counts)
            want -= sum(math.log(counts[t] / total) for t in ids[a : a + seg])
            for t in ids[a : a + seg]:
                counts[t] += 1
    got = recs["unigram-package"]["metrics"]["nll_sum"]
    assert abs(got - want) < 1e-6 * want and got < recs["uniform-file"]["metrics"]["nll_sum"] - 50
