"""Lazy, typo-tolerant registries of methods, tasks and models.

Plugins are found three ways, none of which imports a plugin until it is used:
- the folders `methods/` and `tasks/` of this repository (installed as `tta_bench_methods` and
  `tta_bench_tasks`), plus any folder or file named in a bench file's `plugins:` or in
  $TTA_BENCH_PLUGINS (os.pathsep-separated). A folder holds one-file plugins (`*.py`) and plugin
  packages (sub-folders with an `__init__.py`, whose modules import each other relatively);
- the entry-point groups `tta_bench.methods` and `tta_bench.tasks`;
- direct registration (`@register_method("name")` in code that is already imported).

Files are read with `ast` to learn which names they register and the first docstring line of each
class, so `tta-bench list` describes everything without importing torch-heavy code. Models register
in `tta_bench.protocol.models`, which imports this module (never the other way round).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tta_bench._paths import REPO as _REPO_ROOT
from tta_bench.api.errors import TTABenchError, did_you_mean

KINDS = ("method", "task", "model")
_DECORATORS = {f"register_{k}": k for k in KINDS}
_BUILTIN_PACKAGES = {"method": "tta_bench_methods", "task": "tta_bench_tasks"}


def normalize(name: str) -> str:
    """Names match case-insensitively, with '-' and '_' interchangeable."""
    return name.strip().lower().replace("_", "-")


@dataclass
class Entry:
    name: str
    kind: str
    description: str
    source: str  # where it comes from, for `list` and error messages
    obj: Any = None  # the registered class or factory once loaded
    loader: Callable[[], None] | None = None  # imports the module that registers it


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self.entries: dict[str, Entry] = {}

    def add(self, entry: Entry) -> None:
        key = normalize(entry.name)
        old = self.entries.get(key)
        if old is not None and old.obj is not None and entry.obj is None:
            return  # already loaded; a lazy duplicate adds nothing
        if old is not None and old.obj is None and entry.obj is None and old.source != entry.source:
            raise TTABenchError(
                f"{self.kind} '{entry.name}' is registered twice ({old.source} and {entry.source}); rename one"
            )
        if old is not None and entry.obj is not None and old.obj is None:
            entry.description = entry.description or old.description
            entry.source = old.source
        self.entries[key] = entry

    def names(self) -> list[str]:
        return sorted(e.name for e in self.entries.values())

    def get(self, name: str) -> Any:
        entry = self.entries.get(normalize(name))
        if entry is None:
            raise TTABenchError(f"unknown {self.kind} '{name}': {did_you_mean(normalize(name), self.names())}")
        if entry.obj is None:
            try:
                entry.loader()
            except TTABenchError:
                raise
            except Exception as e:  # plugin code: one line that names its file, not a traceback
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise TTABenchError(
                    f"importing {self.kind} '{name}' from {entry.source} failed ({type(e).__name__}: {first});"
                    " fix that file or remove it from `plugins:`"
                ) from None
            if not entry.source.startswith(str(_REPO_ROOT)):
                IMPORTED.append(entry.source)
            entry = self.entries[normalize(name)]
            if entry.obj is None:
                raise TTABenchError(f"{entry.source} did not register {self.kind} '{name}' when imported")
        return entry.obj


REGISTRIES = {k: Registry(k) for k in KINDS}
IMPORTED: list[str] = []  # plugin files from outside this repository imported so far (`validate` lists them)
_scanned: set[str] = set()


def _register(kind: str, name: str, description: str | None):
    def wrap(obj):
        doc = description or (obj.__doc__ or "").strip().split("\n")[0]
        obj.registry_name = name
        mod = sys.modules.get(getattr(obj, "__module__", ""), None)
        src = getattr(mod, "__file__", None) or getattr(obj, "__module__", "?")
        REGISTRIES[kind].add(Entry(name, kind, doc, str(src), obj=obj))
        return obj

    return wrap


def register_method(name: str, description: str | None = None):
    """Class decorator: make a Method subclass available under `name`."""
    return _register("method", name, description)


def register_task(name: str, description: str | None = None):
    return _register("task", name, description)


def register_model(name: str, description: str | None = None):
    return _register("model", name, description)


def _scan_source(path: Path) -> list[tuple[str, str, str]]:
    """(kind, name, description) for every `@register_<kind>("name")` on a class or function in the file."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError) as e:
        raise TTABenchError(f"cannot read plugin file {path}: {e}; fix or remove it") from None
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            continue
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and dec.args and isinstance(dec.args[0], ast.Constant)):
                continue
            fname = dec.func.attr if isinstance(dec.func, ast.Attribute) else getattr(dec.func, "id", "")
            if fname in _DECORATORS:
                desc = ""
                if len(dec.args) > 1 and isinstance(dec.args[1], ast.Constant):
                    desc = dec.args[1].value
                for kw in dec.keywords:
                    if kw.arg == "description" and isinstance(kw.value, ast.Constant):
                        desc = kw.value.value
                desc = desc or (ast.get_docstring(node) or "").strip().split("\n")[0]
                found.append((_DECORATORS[fname], dec.args[0].value, desc))
    return found


def _exec_file(name: str, path: Path, package_folder: Path | None = None) -> None:
    """Import the module in `path` under `name`; a package's __init__.py with its folder, so that its
    modules' relative imports work."""
    if name in sys.modules:
        return
    search = {"submodule_search_locations": [str(package_folder)]} if package_folder else {}
    spec = importlib.util.spec_from_file_location(name, path, **search)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def _file_loader(path: Path, module_name: str, package: tuple[str, Path] | None) -> Callable[[], None]:
    """Imports the module that registers a plugin: by name when it is importable (the built-in folders
    once installed), else from its file; `package`: (name, folder) of the plugin package it lives in."""

    def load():
        if module_name in sys.modules:
            return
        if module_name.split(".")[0] in _BUILTIN_PACKAGES.values():
            try:
                importlib.import_module(module_name)
                return
            except ModuleNotFoundError as e:
                if not module_name.startswith(str(e.name)):
                    raise
        if package is None:
            _exec_file(module_name, path)
        else:
            _exec_file(package[0], package[1] / "__init__.py", package[1])
            importlib.import_module(module_name)

    return load


def _scan_folder(folder: Path, package: str | None) -> None:
    """Index a plugin file, or a folder of plugin files and packages."""

    def prefix(path: Path) -> str:
        return package or f"tta_bench_plugin_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"

    modules = []  # (file, module name, (package name, folder) or None)
    if folder.is_file():
        modules.append((folder, f"{prefix(folder)}_{folder.stem}", None))
    else:
        for f in sorted(folder.glob("*.py")):
            if not f.name.startswith("_"):
                modules.append((f, f"{package}.{f.stem}" if package else f"{prefix(f)}_{f.stem}", None))
        for pkg in sorted(
            d for d in folder.iterdir() if (d / "__init__.py").is_file() and not d.name.startswith((".", "_"))
        ):
            pkg_name = f"{package}.{pkg.name}" if package else f"{prefix(pkg)}_{pkg.name}"
            for f in sorted(pkg.rglob("*.py")):
                parts = f.relative_to(pkg).with_suffix("").parts
                parts = parts[:-1] if parts[-1] == "__init__" else parts
                modules.append((f, ".".join((pkg_name, *parts)), (pkg_name, pkg)))
    for f, module_name, pkg in modules:
        for kind, name, desc in _scan_source(f):
            REGISTRIES[kind].add(Entry(name, kind, desc, str(f), loader=_file_loader(f, module_name, pkg)))


def _builtin_folder(kind: str) -> Path | None:
    folder = _REPO_ROOT / {"method": "methods", "task": "tasks"}[kind]
    if folder.is_dir():
        return folder
    spec = importlib.util.find_spec(_BUILTIN_PACKAGES[kind])
    if spec and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return None


def _entry_point_loader(ep) -> Callable[[], None]:
    def load():
        obj = ep.load()
        kind = ep.group.split(".")[-1].rstrip("s")
        if getattr(obj, "registry_name", None) is None:
            _register(kind, ep.name, None)(obj)
        elif normalize(obj.registry_name) != normalize(ep.name):
            REGISTRIES[kind].add(Entry(ep.name, kind, (obj.__doc__ or "").split("\n")[0], ep.value, obj=obj))

    return load


def discover(extra_paths: list[str] | tuple[str, ...] = ()) -> None:
    """Index every plugin source; cheap, and safe to call repeatedly."""
    for kind in ("method", "task"):
        folder = _builtin_folder(kind)
        if folder is not None and str(folder) not in _scanned:
            _scanned.add(str(folder))
            package = _BUILTIN_PACKAGES[kind] if folder.name in ("methods", "tasks") else None
            _scan_folder(folder, package)
    env = [p for p in os.environ.get("TTA_BENCH_PLUGINS", "").split(os.pathsep) if p]
    for p in list(extra_paths) + env:
        path = Path(p).expanduser().resolve()
        if str(path) in _scanned:
            continue
        if not path.exists():
            raise TTABenchError(f"plugin path {p} does not exist; fix `plugins:` or $TTA_BENCH_PLUGINS")
        _scan_folder(path, None)
        _scanned.add(str(path))  # only once it scanned cleanly: a broken file is reported every time
    if "entry_points" not in _scanned:
        _scanned.add("entry_points")
        for kind in ("method", "task"):
            for ep in importlib.metadata.entry_points(group=f"tta_bench.{kind}s"):
                if normalize(ep.name) not in REGISTRIES[kind].entries:
                    REGISTRIES[kind].add(
                        Entry(ep.name, kind, f"(entry point {ep.value})", ep.value, loader=_entry_point_loader(ep))
                    )


def get(kind: str, name: str) -> Any:
    discover()
    return REGISTRIES[kind].get(name)


def describe(kind: str) -> list[tuple[str, str]]:
    discover()
    return [(e.name, e.description) for e in sorted(REGISTRIES[kind].entries.values(), key=lambda e: e.name)]


def _package_top(file: Path) -> Path | None:
    """The outermost plugin package folder holding `file` (never a scanned root such as methods/)."""
    roots = {Path(p) for p in _scanned if p != "entry_points"}
    top, folder = None, file.parent
    while (folder / "__init__.py").is_file() and folder not in roots and folder != folder.parent:
        top, folder = folder, folder.parent
    return top


_IMPORTS: dict = {}  # (file, mtime, size) -> its `from ... import` statements: parsed once per version of a file


def _imports_from(file: Path) -> list[tuple[int, list[str]]]:
    """(level, module parts) of every `from X import ...` in `file` ([] when it cannot be parsed)."""
    try:
        st = file.stat()
    except OSError:
        return []
    key = (file, st.st_mtime_ns, st.st_size)
    if key not in _IMPORTS:
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (OSError, SyntaxError):
            tree = None
        _IMPORTS[key] = (
            []
            if tree is None
            else [(n.level, n.module.split(".")) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        )
    return _IMPORTS[key]


def _code_files(file: Path, seen: set) -> None:
    """`file`, its package's files, and those of the built-in packages it imports (absolutely, or
    relatively beyond its package), recursively."""
    top = _package_top(file)
    files = sorted(top.rglob("*.py")) if top else [file]
    new = [f for f in files if f not in seen]
    seen.update(new)
    for f in new:
        for level, parts in _imports_from(f):
            if level == 0 and parts[0] in _BUILTIN_PACKAGES.values():
                kind = next(k for k, v in _BUILTIN_PACKAGES.items() if v == parts[0])
                base = _builtin_folder(kind)
                target = base.joinpath(*parts[1:]) if base else None
            elif level > 1:
                target = f.parent.joinpath(*[".."] * (level - 1), *parts).resolve()
            else:
                continue
            for cand in (target, target.with_suffix(".py") if target else None):
                if cand is not None and cand.is_dir() and (cand / "__init__.py").is_file():
                    _code_files(cand / "__init__.py", seen)
                elif cand is not None and cand.is_file():
                    _code_files(cand, seen)


def code_fingerprint(kind: str, name: str) -> str:
    """sha256 of the source of a registered method or task: its file, or its whole package, and the
    built-in packages that code imports. Part of every cell's resume key."""
    import inspect

    obj = get(kind, name)
    try:
        file = Path(inspect.getsourcefile(obj)).resolve()
    except (TypeError, OSError):
        return "unknown"
    seen: set = set()
    _code_files(file, seen)
    h = hashlib.sha256()
    for f in sorted(seen):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def harness_fingerprint() -> str:
    """sha256 of the harness's own source: every .py file under tta_bench/, in every subpackage, by
    its path (a moved or added file changes it as an edited one does)."""
    h = hashlib.sha256()
    core = _REPO_ROOT / "tta_bench"
    for f in sorted(core.rglob("*.py")):
        h.update(f.relative_to(core).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]
