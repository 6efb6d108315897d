"""Command-line changes to a bench: `--set key.path=value` and the lm-evaluation-harness style flags
(--model, --task, --method, --limit, ...) that are shorthand for such settings. They are applied,
in order, to the bench file's mapping (or to an empty one: a bench from flags alone) before
validation, so a value from the command line is typed (read as YAML) and checked exactly as the same
value in the file. A key path is dotted; a number indexes a list (`methods.3.lr`), `*` every item
(`models.*.dtype`). The run folder's resolved-bench.yaml and each cell's provenance list them."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

from tta_bench.api.errors import TTABenchError
from tta_bench.run import config as config_mod

FLAGS_ONLY = "<command line>"  # the bench's path in messages when there is no bench file
ENTRY_LISTS = ("models", "tasks", "methods")  # their items may be a bare name: `cache` is {name: cache}
RESOLVED_FILE = "resolved-bench.yaml"


def parse_set(text: str) -> tuple[list[str], object]:
    """`a.b.0=value` into its key path and its value, read by the bench file's YAML loader."""
    import yaml

    key, eq, value = text.partition("=")
    parts = key.strip().split(".")
    if not eq or any(not p.strip() for p in parts):
        raise TTABenchError(f"--set {text}: give KEY=VALUE, e.g. --set protocol.segment_len=256")
    try:
        parsed = yaml.load(value, Loader=config_mod._unique_key_loader())
    except yaml.YAMLError as e:
        raise TTABenchError(f"--set {text}: the value is not valid YAML ({str(e).splitlines()[0]}); quote it") from None
    return [p.strip() for p in parts], parsed


def apply(raw: dict, sets: Sequence[str]) -> dict:
    """A copy of the bench mapping with every `--set` applied, in order (a later one wins)."""
    out = copy.deepcopy(raw)
    for text in sets:
        parts, value = parse_set(text)
        _assign(out, parts, value, text)
    return out


def _assign(node, parts: list[str], value, text: str, where: str = "") -> None:
    """Set `value` at `parts` under `node`, creating mappings on the way; `*` sets every list item."""
    key, rest = parts[0], parts[1:]
    here = f"{where}.{key}" if where else key
    if isinstance(node, list) and key == "*":
        for i in range(len(node)):
            _assign(node, [str(i), *rest], value, text, where)
        return
    slot = _slot(node, key, here, text)
    if not rest:
        node[slot] = value
        return
    child = node[slot] if isinstance(node, list) or key in node else None
    if child is None:
        child = node[slot] = {}
    elif isinstance(child, (str, dict)) and here in ENTRY_LISTS and (rest[0] == "*" or rest[0].isdigit()):
        child = node[slot] = [child]  # a single entry written without its list
    elif isinstance(child, str) and where in ENTRY_LISTS:
        child = node[slot] = {"name": child}  # `methods.1.lr` on a bare `cache`
    if not isinstance(child, (dict, list)):
        raise TTABenchError(f"--set {text}: {here} is {child!r}, not a mapping or a list; set {here} itself")
    _assign(child, rest, value, text, here)


def _slot(node, key: str, here: str, text: str):
    """The dict key or list index `key` names in `node`."""
    if isinstance(node, dict):
        return key
    if not key.isdigit() or int(key) >= len(node):
        raise TTABenchError(
            f"--set {text}: {here.rpartition('.')[0]} is a list of {len(node)}; index it with 0 to {len(node) - 1} or *"
        )
    return int(key)


def flag_sets(
    *,
    models: Sequence[str] = (),
    model_args: str | None = None,
    tasks: Sequence[str] = (),
    methods: Sequence[str] = (),
    limit: int | None = None,
    limit_tokens: int | None = None,
    device: str | None = None,
    output: str | None = None,
) -> list[str]:
    """The `--set`s the lm-eval style flags stand for; a repeatable flag gives the whole list (each item
    read as YAML, so `--method '{name: cache, window: 512}'` is a setting with its parameters)."""
    out = [f"{key}={_yaml_list(items)}" for key, items in zip(ENTRY_LISTS, (models, tasks, methods)) if items]
    out += [f"models.*.{arg}" for arg in _model_args(model_args)]
    out += [f"limits.{k}={v}" for k, v in (("docs", limit), ("tokens", limit_tokens)) if v is not None]
    out += [f"device={json.dumps(device)}"] if device is not None else []
    if output is not None:
        folder = Path(output)
        if not folder.name or folder.name.startswith("."):
            raise TTABenchError(f"--output {output}: give a folder such as runs/quick (results go there)")
        out += [f"output_dir={json.dumps(str(folder.parent))}", f"run={json.dumps(folder.name)}"]
    return out


def _yaml_list(items: Sequence[str]) -> str:
    """The flag values as one YAML list: a name quoted, a `{...}` mapping as it was typed (parse_set
    reads it, and says so in one line if it is not YAML)."""
    return "[" + ", ".join(i.strip() if i.lstrip().startswith("{") else json.dumps(i) for i in items) + "]"


def _model_args(text: str | None) -> list[str]:
    """lm-eval's `--model_args dtype=bfloat16,revision=main`: one `key=value` per model setting."""
    if not text:
        return []
    args = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in args if "=" not in a]
    if bad:
        raise TTABenchError(f"--model-args {text}: give key=value pairs separated by commas, e.g. dtype=bfloat16")
    return args


def resolve(path: str | None, sets: Sequence[str]) -> tuple[config_mod.BenchConfig | None, list[str]]:
    """config.validate of the bench file (None: a bench from the flags alone) with `sets` applied;
    the problems an override caused come first, each naming its `--set`."""
    raw = config_mod.read_yaml(path) if path is not None else {}
    cfg, problems = config_mod.validate(apply(raw, sets), path or FLAGS_ONLY)
    if path is None and any(p.endswith(": missing; list at least one") for p in problems):
        raise TTABenchError(
            "give a bench file, or --model, --task and --method (e.g. --model tiny --task wikitext-2 --method none)"
        )
    blamed = [_blame(p, sets) for p in problems]
    return cfg, [p for p in blamed if p.startswith("--set")] + [p for p in blamed if not p.startswith("--set")]


def _blame(problem: str, sets: Sequence[str]) -> str:
    """The problem, prefixed with the last `--set` whose key path contains or lies under its field."""
    field = _components(problem.partition(": ")[0].replace("[", ".").replace("]", ""))
    for text in reversed(sets):
        key = _components(text.partition("=")[0])
        n = min(len(key), len(field))
        if n and all(k in (f, "*") for k, f in zip(key[:n], field[:n])):
            return f"--set {text}: {problem}"
    return problem


def _components(path: str) -> list[str]:
    return [p.strip() for p in path.split(".") if p.strip()]


def load(path: str | None, sets: Sequence[str] = ()) -> config_mod.BenchConfig:
    """The validated config, or one line naming the first problem (config.load with overrides)."""
    cfg, problems = resolve(path, sets)
    if problems:
        more = f" (and {len(problems) - 1} more: run `python -m tta_bench validate` with the same arguments)"
        raise TTABenchError(f"{path or FLAGS_ONLY}: {problems[0]}{more if len(problems) > 1 else ''}")
    return cfg


def resolved_bench(cfg: config_mod.BenchConfig, sets: Sequence[str]) -> dict:
    """What the run folder records: the bench file, the overrides in order, the mapping they gave, and
    the config validation resolved from it (what the cells are built from)."""
    keys = ("run", "output_dir", "device", "dtype", "seeds", "protocol", "limits", "models", "tasks", "methods")
    return {
        "source": None if cfg.path == FLAGS_ONLY else str(Path(cfg.path).resolve()),
        "overrides": list(sets),
        "bench": cfg.raw,
        "resolved": {k: getattr(cfg, k) for k in keys},
    }


def write_resolved(cfg: config_mod.BenchConfig, sets: Sequence[str]) -> Path:
    import yaml

    from tta_bench.results.files import atomic_write

    out = cfg.run_dir / RESOLVED_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, yaml.safe_dump(resolved_bench(cfg, sets), sort_keys=False, allow_unicode=True))
    return out
