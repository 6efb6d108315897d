"""Typed parameters for methods, tasks, models and the executor: a dataclass whose type hints say
what a bench file may give. Every value is checked before anything runs: its type, floats finite, ints
within int64, and the class's own `problems()` (ranges, regexes)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Literal

from tta_bench.api.errors import did_you_mean

INT_BOUND = 2**63 - 1  # what numpy, torch and JSON readers hold without loss or error


def make_params(params_cls, values: dict, where: str, owner: str) -> tuple[object | None, list[str]]:
    """(Params instance, []) or (None, problems); `owner` names the method or task in messages."""
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    hints = typing.get_type_hints(params_cls)
    problems, clean = [], {}
    for key, value in values.items():
        if key not in fields:
            problems.append(f"{where}.{key}: unknown parameter of {owner}; {did_you_mean(str(key), fields)}")
            continue
        ok, value = coerce(value, hints[key])
        if not ok:
            problems.append(f"{where}.{key}: expected {type_name(hints[key])}, got {value!r}")
        clean[key] = value
    if problems:
        return None, problems
    params = params_cls(**clean)
    check = getattr(params, "problems", None)
    extra = [f"{where}: {p}" for p in check()] if check else []
    return (None if extra else params), extra


def type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if tp is float:
        return "a finite number"
    if tp is int:
        return f"an integer of at most {INT_BOUND}"
    if origin is dict:
        return f"a mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "a mapping"
    if origin in (list, tuple):
        return f"a list of {type_name(args[0])}" if args else "a list"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce_union(value, args):
    if value is None and type(None) in args:
        return True, None
    for a in args:
        if a is not type(None):
            ok, v = coerce(value, a)
            if ok:
                return True, v
    return False, value


def _coerce_float(value, args):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False, value
    try:
        v = float(value)
    except (ValueError, OverflowError):
        return False, value
    return math.isfinite(v), (v if math.isfinite(v) else value)


def _coerce_dict(value, args):
    if not isinstance(value, dict):
        return False, value
    kt, vt = args or (typing.Any, typing.Any)
    out = {}
    for k, v in value.items():
        (ok_k, k2), (ok_v, v2) = coerce(k, kt), coerce(v, vt)
        if not (ok_k and ok_v):
            return False, value
        out[k2] = v2
    return True, out


def _coerce_list(value, args):
    if not isinstance(value, (list, tuple)):
        return False, value
    inner = args[0] if args else typing.Any
    out = []
    for v in value:
        ok, v2 = coerce(v, inner)
        if not ok:
            return False, value
        out.append(v2)
    return True, out


# One handle per kind of type hint: (value, the hint's arguments) -> (ok, value).
_COERCE = {
    typing.Any: lambda value, args: (True, value),
    typing.Literal: lambda value, args: (any(value == a and type(value) is type(a) for a in args), value),
    typing.Union: _coerce_union,
    types.UnionType: _coerce_union,
    float: _coerce_float,
    int: lambda value, args: (
        isinstance(value, int) and not isinstance(value, bool) and abs(value) <= INT_BOUND,
        value,
    ),
    bool: lambda value, args: (isinstance(value, bool), value),
    str: lambda value, args: (isinstance(value, str), value),
    dict: _coerce_dict,
    list: _coerce_list,
    tuple: _coerce_list,
}


def coerce(value, tp):
    """(ok, value). YAML gives '1e-3' as a string and ints where floats are meant; nan and inf are
    never a setting."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    handle = _COERCE.get(tp if tp in _COERCE else origin)
    if handle is not None:
        return handle(value, args)
    return isinstance(value, tp) if isinstance(tp, type) else True, value


@dataclass
class ExecutorParams:
    """`executor:` in bench.yaml (a name, or a mapping with `name` and these settings)."""

    name: Literal["local", "ray", "slurm"] = "local"
    shared_fs: bool = True  # workers see the results folder; false: records come back to the driver
    cpus: int = 1  # per group
    gpus: int = 0  # per group
    mem_gb: float = 16.0  # per group (slurm; ray: memory reserved)
    retries: int = 1  # ray: retries of a group whose worker died
    address: str | None = None  # ray: a cluster ("auto", "ray://host:10001"); null: a local instance
    partition: str | None = None  # slurm
    time_min: int = 120  # slurm: time limit per group
    array_parallelism: int = 32  # slurm: groups running at once
    folder: str = "slurm_logs"  # slurm: submitit's job files and logs (relative: under the run folder)
    cluster: Literal["slurm", "local", "debug"] = "slurm"  # submitit's backend: local and debug run here

    def problems(self) -> list[str]:
        out = [
            f"{k} must be >= {lo}, got {getattr(self, k)}"
            for k, lo in (("cpus", 1), ("gpus", 0), ("retries", 0), ("time_min", 1), ("array_parallelism", 1))
            if getattr(self, k) < lo
        ]
        return out + ([f"mem_gb must be > 0, got {self.mem_gb}"] if self.mem_gb <= 0 else [])
