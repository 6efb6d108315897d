"""bench.yaml: schema, validation (every problem at once, each with its field path), grid expansion.
The keys and their meaning are in the README's bench.yaml reference."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TTABenchError, control_character_problems, did_you_mean

TOP_KEYS = {"run", "output_dir", "device", "dtype", "seeds", "protocol", "limits", "models", "tasks",
            "methods", "plugins", "progress", "check", "executor", "published", "log_tokens"}
PROTOCOL_KEYS = {"segment_len", "context_len", "reset"}
LIMIT_KEYS = {"docs", "tokens", "doc_tokens"}
TASK_KEYS = {"name", "label", "split", "prepare_split"}
DTYPES = ("float32", "bfloat16", "float16")
MAX_SEED = 2**32 - 1


@dataclass
class Cell:
    """One (model, task, method+params, seed, protocol) evaluation, fully resolved."""

    model: dict
    task: dict
    method: dict
    seed: int
    protocol: dict
    limits: dict
    dtype: str
    device: str

    def as_dict(self) -> dict:
        return {"model": self.model, "task": self.task, "method": self.method, "seed": self.seed,
                "protocol": self.protocol, "limits": self.limits, "dtype": self.dtype, "device": self.device}

    @property
    def cell_id(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return entry_label(self.method)


def entry_label(m: dict) -> str:
    """A method entry's row name: its label, else its name and settings (a selection cell's grid axes)."""
    if m.get("label") or "grid" not in m:
        return m.get("label") or method_label(m["name"], m["params"])
    axes = {}  # a selection cell: its grid axes, each value once, in order
    for setting in m["grid"]:
        for k, v in setting.items():
            if k not in m["params"] and v not in axes.setdefault(k, []):
                axes[k].append(v)
    return method_label(m["name"], {**m["params"], **axes, "select_on": m["select_on"]})


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


def _is_pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _unknown(keys, allowed, where, problems):
    for k in keys:
        if k not in allowed:
            problems.append(f"{where}{k}: unknown key; {did_you_mean(str(k), allowed)}")


def _entries(raw, where, problems) -> list[dict]:
    """A list of `name` strings or dicts with a `name`, normalised to dicts."""
    if raw is None:
        return []  # a missing key: reported once, at the end
    if isinstance(raw, (str, dict)):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        problems.append(f"{where}: must be a non-empty list")
        return []
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            out.append({"name": item})
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            out.append(dict(item))
        else:
            problems.append(f"{where}[{i}]: must be a name or a mapping with a `name`")
            out.append(None)
    return out


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
                        None, None, f"key '{key}' is given twice (lines {first} and {key_node.start_mark.line + 1}); keep one",
                        key_node.start_mark)
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
    """Check everything that can be checked without loading a model or data; return all problems."""
    from . import registry
    from .method import method_class
    from .models import check_model_ref, model_param_problems
    from .params import ExecutorParams, make_params
    from .separation import check_task_text

    problems: list[str] = control_character_problems(raw)
    _unknown(raw, TOP_KEYS, "", problems)
    cfg = BenchConfig(path=path, raw=raw)
    for key in ("run", "output_dir", "device", "published"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key]:
                problems.append(f"{key}: must be a non-empty string")
            else:
                setattr(cfg, key, raw[key])
    if "run" in raw and isinstance(raw["run"], str) and (os.sep in raw["run"] or raw["run"].startswith(".")):
        problems.append("run: must be a plain name (it becomes a folder under output_dir)")
    if "device" in raw and isinstance(raw["device"], str) and not (raw["device"] in ("auto", "cpu", "cuda") or raw["device"].startswith("cuda:")):
        problems.append(f"device: must be auto, cpu, cuda or cuda:N, got {raw['device']!r}")
    if raw.get("dtype", cfg.dtype) not in DTYPES:
        problems.append(f"dtype: must be one of {', '.join(DTYPES)}, got {raw['dtype']!r}")
    cfg.dtype = raw.get("dtype", cfg.dtype)
    for key in ("progress", "check", "log_tokens"):
        if key in raw:
            if not isinstance(raw[key], bool):
                problems.append(f"{key}: must be true or false")
            else:
                setattr(cfg, key, raw[key])
    seeds = raw.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED for s in seeds):
        problems.append(f"seeds: must be an integer in [0, {MAX_SEED}] (numpy's seed range) or a non-empty list of them")
    elif len(set(seeds)) < len(seeds):
        problems.append("seeds: a seed is listed twice; list each once")
    else:
        cfg.seeds = seeds

    ex = raw.get("executor", "local")
    ex = {"name": ex} if isinstance(ex, str) else ex
    if not isinstance(ex, dict):
        problems.append("executor: must be local, ray, slurm, or a mapping with `name` and settings")
    else:
        typed, errs = make_params(ExecutorParams, ex, "executor", "the executor")
        problems.extend(errs)
        if typed is not None:
            cfg.executor = dataclasses.asdict(typed)

    proto = raw.get("protocol", {}) or {}
    if not isinstance(proto, dict):
        problems.append("protocol: must be a mapping")
        proto = {}
    _unknown(proto, PROTOCOL_KEYS, "protocol.", problems)
    seg = proto.get("segment_len", 128)
    if not _is_pos_int(seg):
        problems.append(f"protocol.segment_len: must be a positive integer, got {seg!r}")
    ctx = proto.get("context_len", 1)
    if not (ctx in (None, "auto") or _is_pos_int(ctx)):
        problems.append(f"protocol.context_len: must be an integer >= 1 or auto, got {ctx!r}")
    reset = proto.get("reset", "document")
    if reset not in ("document", "never"):
        problems.append(f"protocol.reset: must be document or never, got {reset!r}")
    cfg.protocol = {"segment_len": seg, "context_len": "auto" if ctx in (None, "auto") else ctx, "reset": reset}

    limits = raw.get("limits", {}) or {}
    if not isinstance(limits, dict):
        problems.append("limits: must be a mapping")
        limits = {}
    _unknown(limits, LIMIT_KEYS, "limits.", problems)
    for k in LIMIT_KEYS:
        v = limits.get(k)
        if v is not None and not _is_pos_int(v):
            problems.append(f"limits.{k}: must be a positive integer or null, got {v!r}")
    cfg.limits = {k: limits.get(k) for k in sorted(LIMIT_KEYS)}

    plugins = raw.get("plugins", []) or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        problems.append("plugins: must be a list of paths")
        plugins = []
    base = Path(path).resolve().parent
    cfg.plugins = [str((base / Path(p).expanduser()).resolve()) for p in plugins]
    for p, resolved in zip(plugins, cfg.plugins):
        if not Path(resolved).exists():
            problems.append(f"plugins: {p} does not exist (relative paths are read from the bench file's folder)")
    try:
        registry.discover([p for p in cfg.plugins if Path(p).exists()])
    except TTABenchError as e:
        problems.append(f"plugins: {e}")

    for i, m in enumerate(_entries(raw.get("models"), "models", problems)):
        if m is None:
            continue
        problem = check_model_ref(m["name"])
        if problem:
            problems.append(f"models[{i}]: {problem}")
            continue
        given = {k: v for k, v in m.items() if k not in ("name", "label")}
        errs = model_param_problems(m["name"], given, f"models[{i}]")
        problems.extend(errs)
        if not errs:
            cfg.models.append({k: m[k] for k in sorted(m)})

    for i, t in enumerate(_entries(raw.get("tasks"), "tasks", problems)):
        if t is None:
            continue
        where = f"tasks[{i}]"
        try:
            task_cls = registry.get("task", t["name"])
        except TTABenchError as e:
            problems.append(f"{where}: {e}")
            continue
        params = {k: v for k, v in t.items() if k not in TASK_KEYS}
        _, errs = task_cls.make_params(params, where)
        if errs:
            problems.extend(errs)
            continue
        bad = [f"{where}.{k}: must be a non-empty string, got {t[k]!r}" for k in ("split", "prepare_split", "label")
               if k in t and not (isinstance(t[k], str) and t[k])]
        if bad:
            problems.extend(bad)
            continue
        task = task_cls(**params)
        split = t.get("split", "test")
        problem = task.problem(split)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        prep = t.get("prepare_split") or task.prepare_split(split)
        if prep == split:
            problems.append(f"{where}.prepare_split: must differ from the evaluated split '{split}' (SPEC 2)")
        elif t.get("prepare_split") and task.problem(prep):
            problems.append(f"{where}.prepare_split: {task.problem(prep)}")
        elif prep is not None and task.is_local(split) and task.is_local(prep):
            problem = check_task_text(task, split, prep, where)
            if problem:
                problems.append(problem)
        cfg.tasks.append({"name": task_cls.registry_name, "split": split, "prepare_split": prep,
                          "params": params, **({"label": t["label"]} if "label" in t else {})})

    for i, m in enumerate(_entries(raw.get("methods"), "methods", problems)):
        if m is None:
            continue
        where = f"methods[{i}]"
        if "label" in m and not (isinstance(m["label"], str) and m["label"].strip()):
            problems.append(f"{where}.label: must be a non-empty string, got {m['label']!r}")
            continue
        try:
            cls = method_class(m["name"])
        except TTABenchError as e:
            problems.append(f"{where}: {e}")
            continue
        axes = {k: (v if isinstance(v, list) else [v]) for k, v in m.items() if k not in ("name", "label", "select_on")}
        select_on, grid = m.get("select_on"), []
        if select_on is not None:
            if not isinstance(select_on, str) or not select_on:
                problems.append(f"{where}.select_on: must be a split name, e.g. valid")
                continue
            for t in cfg.tasks:
                if select_on == t["split"]:
                    problems.append(f"{where}.select_on: choosing on the evaluated split '{select_on}' is refused;"
                                    " select on another split (e.g. valid)")
                else:
                    problem = registry.get("task", t["name"])(**t["params"]).problem(select_on)
                    if problem:
                        problems.append(f"{where}.select_on: {problem}")
        if any(not vals for vals in axes.values()):
            problems.append(f"{where}: an empty list gives no settings; remove it or give values")
            continue
        for combo in itertools.product(*axes.values()) if axes else [()]:
            values = dict(zip(axes, combo))
            params, errs = cls.make_params(values, where)
            if errs:
                problems.extend(e for e in errs if e not in problems)
                continue
            given = {k: getattr(params, k) for k in values}
            if select_on is not None:
                grid.append(given)
                continue
            entry = {"name": cls.registry_name, "params": given}
            if "label" in m:
                entry["label"] = m["label"] if len(axes) == 0 or all(len(v) == 1 for v in axes.values()) else f"{m['label']}{given}"
            cfg.methods.append(entry)
        if grid:  # one cell: the runner picks the best setting on select_on, then evaluates with it
            entry = {"name": cls.registry_name, "params": {k: grid[0][k] for k, v in axes.items() if len(v) == 1},
                     "grid": grid, "select_on": select_on}
            if "label" in m:
                entry["label"] = m["label"]
            cfg.methods.append(entry)

    problems.extend(_label_problems(cfg.methods))
    for k in ("models", "tasks", "methods"):
        if k not in raw:
            problems.append(f"{k}: missing; list at least one")
    return (None if problems else cfg), problems


def _label_problems(methods: list[dict]) -> list[str]:
    """A leaderboard row is one setting: a label shared by two settings would merge them as if they
    were seeds, and the row labelled `none` is every ratio's baseline."""
    out, settings = [], {}
    for m in methods:
        label = entry_label(m)
        setting = json.dumps({k: v for k, v in m.items() if k != "label"}, sort_keys=True)
        if label == "none" and m["name"] != "none":  # (an empty or non-string label was refused with its entry)
            out.append(f"methods: '{m['name']}' is labelled 'none', the baseline's name; choose another label")
        elif label in settings and settings[label] != setting:
            out.append(f"methods: label '{label}' is given to two different settings ({settings[label]} and {setting});"
                       " give each its own label")
        elif label in settings:
            out.append(f"methods: '{label}' is listed twice; list each setting once")
        settings.setdefault(label, setting)
    return out


def load(path: str) -> BenchConfig:
    cfg, problems = validate(read_yaml(path), path)
    if problems:
        more = f" (and {len(problems) - 1} more: run `python -m tta_bench validate {path}`)" if len(problems) > 1 else ""
        raise TTABenchError(f"{path}: {problems[0]}{more}")
    return cfg


def expand(cfg: BenchConfig, device: str) -> list[Cell]:
    """The grid, `none` first in each (model, task) so ratios to it come from the same run."""
    cells = []
    for model, task, seed in itertools.product(cfg.models, cfg.tasks, cfg.seeds):
        methods = sorted(cfg.methods, key=lambda m: m["name"] != "none")
        for method in methods:
            cells.append(Cell(copy.deepcopy(model), copy.deepcopy(task), copy.deepcopy(method), seed,
                              dict(cfg.protocol), dict(cfg.limits), cfg.dtype, device))
    return cells
