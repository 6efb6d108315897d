"""The parts of a bench file (bench.yaml), each checked by one function that fills its fields of the
config and returns its problems, each with its field path (config.validate runs them in order)."""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tta_bench.api.errors import TTABenchError, did_you_mean

if TYPE_CHECKING:
    from tta_bench.run.config import BenchConfig

TOP_KEYS = {
    "run",
    "output_dir",
    "device",
    "dtype",
    "seeds",
    "protocol",
    "limits",
    "models",
    "tasks",
    "methods",
    "plugins",
    "progress",
    "check",
    "executor",
    "published",
    "log_tokens",
}
PROTOCOL_KEYS = {"segment_len", "context_len", "reset", "lanes"}
LIMIT_KEYS = {"docs", "tokens", "doc_tokens"}
DRAW_KEYS = {"min_doc_tokens", "draw", "draw_seed"}  # which documents: written into the config only when set
TASK_KEYS = {"name", "label", "split", "prepare_split"}
METHOD_KEYS = {"name", "label", "select_on", "seeds"}  # a method entry's keys that are not its params
DTYPES = ("float32", "bfloat16", "float16")
MAX_SEED = 2**32 - 1


def _is_pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_seed(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED


def unknown_keys(keys, allowed, where) -> list[str]:
    return [f"{where}{k}: unknown key; {did_you_mean(str(k), allowed)}" for k in keys if k not in allowed]


def _add_new(problems: list[str], found: list[str]) -> None:
    """Append each problem not already listed (every setting of a grid finds the same bad value)."""
    for p in found:
        if p not in problems:
            problems.append(p)


def _mapping(raw: dict, key: str) -> tuple[dict, list[str]]:
    """An optional mapping of the bench (absent or null: empty)."""
    value = raw.get(key, {}) or {}
    return (value, []) if isinstance(value, dict) else ({}, [f"{key}: must be a mapping"])


def _entries(raw, where) -> tuple[list[dict | None], list[str]]:
    """A list of `name` strings or dicts with a `name`, normalised to dicts (None where neither)."""
    if raw is None:
        return [], []  # a missing key: reported once, at the end
    if isinstance(raw, (str, dict)):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        return [], [f"{where}: must be a non-empty list"]
    out, problems = [], []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            out.append({"name": item})
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            out.append(dict(item))
        else:
            problems.append(f"{where}[{i}]: must be a name or a mapping with a `name`")
            out.append(None)
    return out, problems


def _set_checked(raw: dict, cfg: BenchConfig, keys: tuple, valid, must: str) -> list[str]:
    """Each of `keys` the bench gives: set on the config when `valid`, else the problem `key: must`."""
    problems = []
    for key in (k for k in keys if k in raw):
        if valid(raw[key]):
            setattr(cfg, key, raw[key])
        else:
            problems.append(f"{key}: {must}")
    return problems


def _validate_scalars(raw: dict, cfg: BenchConfig) -> list[str]:
    """run, output_dir, device, published, dtype and the true/false switches."""
    problems = _set_checked(
        raw,
        cfg,
        ("run", "output_dir", "device", "published"),
        lambda v: isinstance(v, str) and v != "",
        "must be a non-empty string",
    )
    run, device = raw.get("run"), raw.get("device")
    if isinstance(run, str) and (os.sep in run or run.startswith(".")):
        problems.append("run: must be a plain name (it becomes a folder under output_dir)")
    if isinstance(device, str) and not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        problems.append(f"device: must be auto, cpu, cuda or cuda:N, got {device!r}")
    if raw.get("dtype", cfg.dtype) not in DTYPES:
        problems.append(f"dtype: must be one of {', '.join(DTYPES)}, got {raw['dtype']!r}")
    cfg.dtype = raw.get("dtype", cfg.dtype)
    return problems + _set_checked(
        raw, cfg, ("progress", "check", "log_tokens"), lambda v: isinstance(v, bool), "must be true or false"
    )


def seed_list(seeds, where: str) -> tuple[list[int] | None, str | None]:
    """A seed or a list of distinct seeds, as a list; or the one-line problem."""
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if not isinstance(seeds, list) or not seeds or not all(map(_is_seed, seeds)):
        return None, f"{where}: must be an integer in [0, {MAX_SEED}] (numpy's seed range) or a non-empty list of them"
    if len(set(seeds)) < len(seeds):
        return None, f"{where}: a seed is listed twice; list each once"
    return seeds, None


def _validate_seeds(raw: dict, cfg: BenchConfig) -> list[str]:
    seeds, problem = seed_list(raw.get("seeds", [0]), "seeds")
    if problem:
        return [problem]
    cfg.seeds = seeds
    return []


def _validate_executor(raw: dict, cfg: BenchConfig) -> list[str]:
    from tta_bench.api.params import ExecutorParams, make_params

    ex = raw.get("executor", "local")
    ex = {"name": ex} if isinstance(ex, str) else ex
    if not isinstance(ex, dict):
        return ["executor: must be local, ray, slurm, or a mapping with `name` and settings"]
    typed, problems = make_params(ExecutorParams, ex, "executor", "the executor")
    if typed is not None:
        cfg.executor = dataclasses.asdict(typed)
    return problems


def _validate_protocol(raw: dict, cfg: BenchConfig) -> list[str]:
    proto, problems = _mapping(raw, "protocol")
    problems += unknown_keys(proto, PROTOCOL_KEYS, "protocol.")
    seg, ctx, reset = proto.get("segment_len", 128), proto.get("context_len", 1), proto.get("reset", "document")
    if not _is_pos_int(seg):
        problems.append(f"protocol.segment_len: must be a positive integer, got {seg!r}")
    if not (ctx in (None, "auto") or _is_pos_int(ctx)):
        problems.append(f"protocol.context_len: must be an integer >= 1 or auto, got {ctx!r}")
    if reset not in ("document", "never"):
        problems.append(f"protocol.reset: must be document or never, got {reset!r}")
    lanes = proto.get("lanes", 1)
    if not _is_pos_int(lanes):
        problems.append(f"protocol.lanes: must be a positive integer, got {lanes!r}")
    elif lanes > 1 and reset == "never":
        problems.append(
            f"protocol.lanes: {lanes} lanes need reset: document (under never the stream is one sequence,"
            " read in order by one lane); set lanes: 1 or reset: document"
        )
    cfg.protocol = {"segment_len": seg, "context_len": "auto" if ctx in (None, "auto") else ctx, "reset": reset}
    if lanes != 1:  # one lane is the default: cells without lanes keep their ids
        cfg.protocol["lanes"] = lanes
    return problems


def _validate_limits(raw: dict, cfg: BenchConfig) -> list[str]:
    limits, problems = _mapping(raw, "limits")
    problems += unknown_keys(limits, LIMIT_KEYS | DRAW_KEYS, "limits.")
    problems += [
        f"limits.{k}: must be a positive integer or null, got {limits[k]!r}"
        for k in sorted(LIMIT_KEYS | {"min_doc_tokens"})
        if limits.get(k) is not None and not _is_pos_int(limits[k])
    ]
    if limits.get("draw", "first") not in ("first", "random"):
        problems.append(f"limits.draw: must be first or random, got {limits['draw']!r}")
    if "draw_seed" in limits and not _is_seed(limits["draw_seed"]):
        problems.append(f"limits.draw_seed: must be an integer from 0 to {MAX_SEED}, got {limits['draw_seed']!r}")
    cfg.limits = {k: limits.get(k) for k in sorted(LIMIT_KEYS)}
    # a bench that draws no documents keeps the config (and the cell ids) it always had
    if limits.get("draw", "first") != "first" or limits.get("min_doc_tokens"):
        cfg.limits.update({"draw": limits.get("draw", "first"), "draw_seed": limits.get("draw_seed", 0)})
        cfg.limits["min_doc_tokens"] = limits.get("min_doc_tokens") or 1
    return problems


def _validate_plugins(raw: dict, cfg: BenchConfig) -> list[str]:
    """Plugin paths, read from the bench file's folder, and indexed with the built-in methods and tasks."""
    from tta_bench.api import registry

    plugins, problems = raw.get("plugins", []) or [], []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        plugins, problems = [], ["plugins: must be a list of paths"]
    base = Path(cfg.path).resolve().parent
    cfg.plugins = [str((base / Path(p).expanduser()).resolve()) for p in plugins]
    problems += [
        f"plugins: {p} does not exist (relative paths are read from the bench file's folder)"
        for p, resolved in zip(plugins, cfg.plugins)
        if not Path(resolved).exists()
    ]
    try:
        registry.discover([p for p in cfg.plugins if Path(p).exists()])
    except TTABenchError as e:
        problems.append(f"plugins: {e}")
    return problems


def _validate_models(raw: dict, cfg: BenchConfig) -> list[str]:
    from tta_bench.protocol.models import check_model_ref, model_param_problems

    entries, problems = _entries(raw.get("models"), "models")
    for i, m in ((i, m) for i, m in enumerate(entries) if m is not None):
        problem = check_model_ref(m["name"])
        if problem:
            problems.append(f"models[{i}]: {problem}")
            continue
        errs = model_param_problems(
            m["name"], {k: v for k, v in m.items() if k not in ("name", "label")}, f"models[{i}]"
        )
        problems += errs
        if not errs:
            cfg.models.append({k: m[k] for k in sorted(m)})
    return problems


def _validate_tasks(raw: dict, cfg: BenchConfig) -> list[str]:
    entries, problems = _entries(raw.get("tasks"), "tasks")
    for i, t in ((i, t) for i, t in enumerate(entries) if t is not None):
        task, errs = _task_entry(t, f"tasks[{i}]")
        problems += errs
        if task is not None:
            cfg.tasks.append(task)
    return problems


def _task_entry(t: dict, where: str) -> tuple[dict | None, list[str]]:
    """The task entry resolved (registry name, split, prepare split, params, label) and its problems;
    None when it cannot be (an entry with only a prepare-split problem is kept, its problem listed)."""
    from tta_bench.api import registry

    try:
        task_cls = registry.get("task", t["name"])
    except TTABenchError as e:
        return None, [f"{where}: {e}"]
    params = {k: v for k, v in t.items() if k not in TASK_KEYS}
    _, errs = task_cls.make_params(params, where)
    if errs:
        return None, errs
    bad = [
        f"{where}.{k}: must be a non-empty string, got {t[k]!r}"
        for k in ("split", "prepare_split", "label")
        if k in t and not (isinstance(t[k], str) and t[k])
    ]
    if bad:
        return None, bad
    task, split = task_cls(**params), t.get("split", "test")
    problem = task.split_problem(split)
    if problem:
        return None, [f"{where}: {problem}"]
    prep = t.get("prepare_split") or task.prepare_split(split)
    entry = {
        "name": task_cls.registry_name,
        "split": split,
        "prepare_split": prep,
        "params": params,
        **({"label": t["label"]} if "label" in t else {}),
    }
    return entry, _prepare_split_problems(task, t, split, prep, where)


def _prepare_split_problems(task, t: dict, split: str, prep: str | None, where: str) -> list[str]:
    """The prepare split differs from the evaluated one, exists, and shares no text with it (SPEC 2)."""
    from tta_bench.checks.separation import check_task_text

    if prep == split:
        return [f"{where}.prepare_split: must differ from the evaluated split '{split}' (SPEC 2)"]
    if t.get("prepare_split") and task.split_problem(prep):
        return [f"{where}.prepare_split: {task.split_problem(prep)}"]
    if prep is not None and task.split_is_local(split) and task.split_is_local(prep):
        problem = check_task_text(task, split, prep, where)
        return [problem] if problem else []
    return []


def _validate_methods(raw: dict, cfg: BenchConfig) -> list[str]:
    entries, problems = _entries(raw.get("methods"), "methods")
    for i, m in ((i, m) for i, m in enumerate(entries) if m is not None):
        settings, errs = _method_entries(m, f"methods[{i}]", cfg.tasks)
        problems += errs
        cfg.methods += settings
    return problems


def _method_entries(m: dict, where: str, tasks: list[dict]) -> tuple[list[dict], list[str]]:
    """A method entry's settings, one per combination of its listed values; with `select_on`, one
    selection entry over them all (the runner picks the best on that split, then evaluates with it)."""
    from tta_bench.api.method import method_class

    if "label" in m and not (isinstance(m["label"], str) and m["label"].strip()):
        return [], [f"{where}.label: must be a non-empty string, got {m['label']!r}"]
    try:
        cls = method_class(m["name"])
    except TTABenchError as e:
        return [], [f"{where}: {e}"]
    axes = {k: (v if isinstance(v, list) else [v]) for k, v in m.items() if k not in METHOD_KEYS}
    select_on, label = m.get("select_on"), ({"label": m["label"]} if "label" in m else {})
    # a method's own seeds (a trained method run at several) replace the bench's for its cells
    seeds, problem = seed_list(m["seeds"], f"{where}.seeds") if "seeds" in m else (None, None)
    if problem:
        return [], [problem]
    own = {"seeds": seeds} if seeds else {}
    if select_on is not None and not (isinstance(select_on, str) and select_on):
        return [], [f"{where}.select_on: must be a split name, e.g. valid"]
    problems = [] if select_on is None else _select_on_problems(select_on, where, tasks)
    if any(not vals for vals in axes.values()):
        return [], problems + [f"{where}: an empty list gives no settings; remove it or give values"]
    grid, errs = _grid(cls, axes, where)
    _add_new(problems, errs)
    if select_on is None:
        return [{**_setting_entry(cls.registry_name, given, m, axes), **own} for given in grid], problems
    if not grid:
        return [], problems
    fixed = {k: grid[0][k] for k, v in axes.items() if len(v) == 1}
    entry = {"name": cls.registry_name, "params": fixed, "grid": grid, "select_on": select_on, **label}
    return [{**entry, **own}], problems


def _setting_entry(name: str, given: dict, m: dict, axes: dict) -> dict:
    """One setting of a method entry; a label given to several settings gets each one's values appended."""
    entry = {"name": name, "params": given}
    if "label" in m:
        one = all(len(v) == 1 for v in axes.values())
        entry["label"] = m["label"] if one else f"{m['label']}{given}"
    return entry


def _grid(cls, axes: dict, where: str) -> tuple[list[dict], list[str]]:
    """Every combination of the listed values that the method's params accept, with the given keys only."""
    settings, problems = [], []
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        params, errs = cls.make_params(values, where)
        _add_new(problems, errs)
        if not errs:
            settings.append({k: getattr(params, k) for k in values})
    return settings, problems


def _select_on_problems(select_on: str, where: str, tasks: list[dict]) -> list[str]:
    """A selection split is never a task's evaluated split, every task has it, and it shares no text
    with the prepare split (the tuning documents are held out from what prepare sees: SPEC 4)."""
    from tta_bench.api import registry
    from tta_bench.checks.separation import check_task_text

    problems = []
    for t in tasks:
        if select_on == t["split"]:
            problems.append(
                f"{where}.select_on: choosing on the evaluated split '{select_on}' is refused;"
                " select on another split (e.g. valid)"
            )
            continue
        task = registry.get("task", t["name"])(**t["params"])
        problem = task.split_problem(select_on)
        prep = t["prepare_split"]
        if (
            not problem
            and prep not in (None, select_on)
            and task.split_is_local(select_on)
            and task.split_is_local(prep)
        ):
            problem = check_task_text(task, select_on, prep, f"{where}.select_on")
        if problem:
            problems.append(problem if problem.startswith(where) else f"{where}.select_on: {problem}")
    return problems


# In the order validate checks them (their problems are listed in this order); the methods read the tasks.
PARTS = (
    _validate_scalars,
    _validate_seeds,
    _validate_executor,
    _validate_protocol,
    _validate_limits,
    _validate_plugins,
    _validate_models,
    _validate_tasks,
    _validate_methods,
)
