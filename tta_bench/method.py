"""The method interface: every method scores a segment, and only then may adapt on it (SPEC 2).

The harness calls `prepare(data)` once per cell (`data`: a tta_bench.prepared.PrepareData, never the
evaluated split), `reset` at the start and at every document boundary under reset `document`, then
`score` and `adapt` for each segment in stream order, and `close` at the end. Forwards through
`self.lm` are counted automatically; a method adds the flops a forward trace cannot see (backward,
update, search) with `self.ledger.add(key, flops)`. The README's "Adding a method" has an example.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import TTABenchError
from .params import make_params


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
    # Settings the validity checks and the tests over every method also run (beside each discrete option's
    # other values), e.g. a combination whose code path differs.
    check_variants: list = []
    # What the method's paper claims about it (SPEC 9), printed by `report` beside what was measured.
    claim: str = ""

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

    # -- controls (SPEC 3): what a test-time adaptation gain is measured against ---------------------
    @classmethod
    def adapts_at_test_time(cls, params) -> bool:
        """Whether this setting learns from the evaluated text as it reads it (False: the base model,
        or a control: prepared on the prepare split, then static)."""
        return True

    @classmethod
    def control(cls, params) -> dict | None:
        """The setting with this one's preparation and without its test-time adaptation, as
        {"method": name, "params": {...}}: the leaderboard's control row is a cell of that method whose
        resolved params include these. None: the control is `none` (nothing trained on the prepare split)."""
        return None

    # -- what a setting brings in itself ---------------------------------------------------------
    @classmethod
    def given_files(cls, params) -> list[str]:
        """Files this setting reads besides the harness's data (e.g. a given checkpoint): their
        content is part of a cell's resume key."""
        return []

    @classmethod
    def given_data(cls, params) -> list[tuple[str, "numpy.ndarray"]]:
        """Data this setting brings into prepare besides PrepareData, as (what it is, the run hashes
        of its tokens: tta_bench.separation.stream_runs), e.g. a given checkpoint's recorded
        training data. A cell is refused when any of it shares a run with the evaluated stream."""
        return []

    # -- parameters --------------------------------------------------------------------------
    @classmethod
    def param_fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls.Params)}

    @classmethod
    def make_params(cls, values: dict, where: str = "params") -> tuple["Method.Params | None", list[str]]:
        """Typed Params from config values, and every problem found (with its field path)."""
        return make_params(cls.Params, values, where, f"method '{cls.registry_name}'")


def method_class(name: str) -> type[Method]:
    from .registry import get

    cls = get("method", name)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TTABenchError(f"method '{name}' is registered as {cls!r}, which is not a tta_bench Method subclass")
    if cls.score is Method.score:
        raise TTABenchError(f"method '{name}' ({_source(cls)}) does not implement score(); every method must score a segment")
    return cls


def _source(cls) -> str:
    import inspect

    try:
        return inspect.getsourcefile(cls) or cls.__module__
    except TypeError:
        return cls.__module__
