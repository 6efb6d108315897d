"""The method interface: every method scores a segment, and only then may adapt on it (SPEC 2).

The harness calls `prepare(data)` once per cell (`data`: a tta_bench.prepared.PrepareData, never the
evaluated split), `reset` at the start and at every document boundary under reset `document`, then
`score` and `adapt` for each segment in stream order, and `close` at the end. Forwards through
`self.lm` are counted automatically; a method adds the flops a forward trace cannot see (backward,
update, search) with `self.ledger.add(key, flops)`. The README's "Adding a method" has an example.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from .errors import TTABenchError, did_you_mean


@dataclass
class Segment:
    ids: "torch.Tensor"  # (1, L) input: context, then the segment's targets shifted right by one
    n: int  # the last n input positions predict the n targets
    doc: int  # document index in the stream
    start: int  # position of the first target within its document
    targets: "torch.Tensor | None" = None  # (n,) target ids: given to adapt(), never to score()


class Method:
    """Base class; subclasses set Params and implement score (and usually adapt)."""

    @dataclass
    class Params:
        pass

    registry_name = ""
    # pip packages the method imports beyond the harness's own (recorded in each cell's provenance)
    requires: tuple = ()
    # Parameter overrides that make a cheap run on the tiny test model (validity checks and the
    # tests parametrised over every method use them), e.g. {"train_steps": 5}.
    quick_params: dict = {}

    def __init__(self, lm, params: "Method.Params", seed: int = 0, protocol=None):
        self.lm = lm
        self.params = params
        self.seed = seed
        self.protocol = protocol

    @property
    def ledger(self):
        return self.lm.ledger

    def prepare(self, data) -> None:
        """Build state from a non-evaluated split (statistics, training, a datastore)."""

    def reset(self) -> None:
        """Return to the state after prepare (document boundaries under reset=document)."""

    def score(self, seg: Segment):
        raise NotImplementedError

    def adapt(self, seg: Segment) -> None:
        """Learn from a segment that has been scored."""

    def close(self) -> None:
        """End of the cell (always called, also after an error): give the shared model back as it was
        found (weights, requires_grad), since the runner reuses one loaded LM across cells."""

    # -- parameters --------------------------------------------------------------------------
    @classmethod
    def param_fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls.Params)}

    @classmethod
    def make_params(cls, values: dict, where: str = "params") -> tuple["Method.Params | None", list[str]]:
        """Typed Params from config values, and every problem found (with its field path)."""
        fields = cls.param_fields()
        hints = typing.get_type_hints(cls.Params)
        problems, clean = [], {}
        for key, value in values.items():
            if key not in fields:
                problems.append(f"{where}.{key}: unknown parameter of method '{cls.registry_name}'; {did_you_mean(key, fields)}")
                continue
            ok, value = _coerce(value, hints[key])
            if not ok:
                problems.append(f"{where}.{key}: expected {_type_name(hints[key])}, got {value!r}")
            clean[key] = value
        if problems:
            return None, problems
        params = cls.Params(**clean)
        check = getattr(params, "problems", None)
        extra = [f"{where}: {p}" for p in check()] if check else []
        return (None if extra else params), extra


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value, tp):
    """(ok, value): YAML gives '1e-3' as a string, and ints where floats are meant."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return value in args, value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        if value is None and type(None) in args:
            return True, None
        for a in args:
            if a is type(None):
                continue
            ok, v = _coerce(value, a)
            if ok:
                return True, v
        return False, value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)), list(value) if isinstance(value, (list, tuple)) else value
    return True, value


def method_class(name: str) -> type[Method]:
    from .registry import get

    cls = get("method", name)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TTABenchError(f"method '{name}' is registered as {cls!r}, which is not a tta_bench Method subclass")
    return cls
