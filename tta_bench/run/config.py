"""bench.yaml: the resolved config, validation (every problem at once, each with its field path; the
parts are checked in schema.py), cells and grid expansion. The keys and their meaning are in the
README's bench.yaml reference."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from tta_bench.api.errors import TTABenchError, control_character_problems
from tta_bench.run import schema


@dataclass(frozen=True)
class Selection:
    """A `select_on` cell's choice: its settings (`grid`, each complete), tried on `split`, never the
    evaluated one; the runner evaluates the one of lowest NLL there."""

    grid: list
    split: str

    def axes(self, fixed: dict) -> dict:
        """The grid's axes besides the `fixed` params, each value once, in order."""
        axes = {}
        for setting in self.grid:
            for k, v in setting.items():
                if k not in fixed and v not in axes.setdefault(k, []):
                    axes[k].append(v)
        return axes


def split_entry(entry: dict) -> tuple[dict, Selection | None]:
    """A method entry of the bench config as a cell holds it: the setting (name, params, label) and,
    for a `select_on` entry, its selection apart."""
    entry = {k: v for k, v in entry.items() if k != "seeds"}  # the cell holds its one seed apart
    if "grid" not in entry:
        return entry, None
    return {k: v for k, v in entry.items() if k not in ("grid", "select_on")}, Selection(
        entry["grid"], entry["select_on"]
    )


def join_entry(method: dict, selection: Selection | None) -> dict:
    """The method entry as the bench config writes it (and a cell id hashes it): split_entry undone."""
    if selection is None:
        return method
    entry = {"name": method["name"], "params": method["params"], "grid": selection.grid, "select_on": selection.split}
    return {**entry, **{k: v for k, v in method.items() if k not in entry}}  # the label last, as validate writes it


@dataclass
class Cell:
    """One (model, task, method+params, seed, protocol) evaluation, fully resolved; a `select_on`
    cell also has its `selection` (its `method` params: those every setting of the grid shares)."""

    model: dict
    task: dict
    method: dict
    seed: int
    protocol: dict
    limits: dict
    dtype: str
    device: str
    selection: Selection | None = None

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "task": self.task,
            "method": join_entry(self.method, self.selection),
            "seed": self.seed,
            "protocol": self.protocol,
            "limits": self.limits,
            "dtype": self.dtype,
            "device": self.device,
        }

    @property
    def cell_id(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return setting_label(self.method, self.selection)


def setting_label(method: dict, selection: Selection | None = None) -> str:
    """A setting's row name: its label, else its name and params (a selection cell: and its grid axes)."""
    if method.get("label") or selection is None:
        return method.get("label") or method_label(method["name"], method["params"])
    axes = selection.axes(method["params"])
    return method_label(method["name"], {**method["params"], **axes, "select_on": selection.split})


def method_label(name: str, params: dict) -> str:
    if not params:
        return name
    return f"{name}(" + ", ".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"


@dataclass
class BenchConfig:
    path: str
    raw: dict
    run: str = "default"
    output_dir: str = "results"
    published: str = ""  # a folder of published cells that the run's numbers are compared with at the end
    device: str = "auto"
    dtype: str = "float32"
    seeds: list = field(default_factory=lambda: [0])
    protocol: dict = field(default_factory=dict)
    limits: dict = field(default_factory=dict)
    models: list = field(default_factory=list)
    tasks: list = field(default_factory=list)
    methods: list = field(default_factory=list)
    plugins: list = field(default_factory=list)
    progress: bool = True
    check: bool = False
    log_tokens: bool = False  # keep every scored token's log-probability beside its cell (for `report`)
    executor: dict = field(default_factory=lambda: {"name": "local"})

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run


def _unique_key_loader():
    """yaml's SafeLoader, except that a key given twice in one mapping is an error (yaml keeps the last)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if first != key_node.start_mark.line + 1:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key '{key}' is given twice (lines {first} and {key_node.start_mark.line + 1}); keep one",
                        key_node.start_mark,
                    )
            return super().construct_mapping(node, deep)

    return Loader


def read_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise TTABenchError(f"bench file {path} does not exist; give the path to a bench YAML file")
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_unique_key_loader())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TTABenchError(f"{path}: invalid YAML{where}: {problem}; fix the syntax") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TTABenchError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise TTABenchError(f"{path}: the top level must be a mapping (keys like models:, tasks:, methods:)")
    return raw


def validate(raw: dict, path: str = "bench.yaml") -> tuple[BenchConfig | None, list[str]]:
    """Check everything that can be checked without loading a model or data; return all problems
    (and the config when there are none). Each part fills its fields of the config and returns its
    problems; the methods read the tasks."""
    cfg = BenchConfig(path=path, raw=raw)
    problems = control_character_problems(raw) + schema.unknown_keys(raw, schema.TOP_KEYS, "")
    for part in schema.PARTS:
        problems += part(raw, cfg)
    problems += _label_problems(cfg.methods)
    problems += [f"{k}: missing; list at least one" for k in ("models", "tasks", "methods") if k not in raw]
    return (None if problems else cfg), problems


def _label_problems(methods: list[dict]) -> list[str]:
    """A leaderboard row is one setting: a label shared by two settings would merge them as if they
    were seeds, and the row labelled `none` is every ratio's baseline."""
    out, settings = [], {}
    for m in methods:
        label = setting_label(*split_entry(m))
        setting = json.dumps({k: v for k, v in m.items() if k != "label"}, sort_keys=True)
        if label == "none" and m["name"] != "none":  # (an empty or non-string label was refused with its entry)
            out.append(f"methods: '{m['name']}' is labelled 'none', the baseline's name; choose another label")
        elif label in settings and settings[label] != setting:
            out.append(
                f"methods: label '{label}' is given to two different settings ({settings[label]} and {setting});"
                " give each its own label"
            )
        elif label in settings:
            out.append(f"methods: '{label}' is listed twice; list each setting once")
        settings.setdefault(label, setting)
    return out


def load(path: str) -> BenchConfig:
    cfg, problems = validate(read_yaml(path), path)
    if problems:
        more = (
            f" (and {len(problems) - 1} more: run `python -m tta_bench validate {path}`)" if len(problems) > 1 else ""
        )
        raise TTABenchError(f"{path}: {problems[0]}{more}")
    return cfg


def expand(cfg: BenchConfig, device: str) -> list[Cell]:
    """The grid, `none` first in each (model, task) so ratios to it come from the same run."""
    cells = []
    seeds = list(dict.fromkeys([*cfg.seeds, *(s for m in cfg.methods for s in m.get("seeds", []))]))
    for model, task, seed in itertools.product(cfg.models, cfg.tasks, seeds):
        for entry in sorted(cfg.methods, key=lambda m: m["name"] != "none"):
            if seed not in entry.get("seeds", cfg.seeds):
                continue
            method, selection = split_entry(copy.deepcopy(entry))
            cells.append(
                Cell(
                    copy.deepcopy(model),
                    copy.deepcopy(task),
                    method,
                    seed,
                    dict(cfg.protocol),
                    dict(cfg.limits),
                    cfg.dtype,
                    device,
                    selection,
                )
            )
    return cells
