"""The method interface: every method scores a segment, and only then may adapt on it (SPEC 2).

`Method`'s docstring is the whole contract (every hook, when the harness calls it, what it must
return, and what a method must add to the FLOP ledger itself); `method_class` refuses a registered
class that leaves an abstract hook (`score`, `adapts_at_test_time`) out. The README's "Adding a
method" has a worked example.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tta_bench.api.errors import TTABenchError
from tta_bench.api.params import make_params

if TYPE_CHECKING:  # annotations only: the API imports neither at run time
    import numpy
    import torch


@dataclass
class Segment:
    ids: "torch.Tensor"  # (1, L) input: context, then the segment's targets shifted right by one
    n: int  # the last n input positions predict the n targets
    doc: int  # document index in the stream
    start: int  # position of the first target within its document
    targets: "torch.Tensor | None" = None  # (n,) target ids: given to adapt(), never to score()
    lane: int = 0  # which lane's state reads it (protocol.lanes; always 0 with one lane)


class Method(abc.ABC):
    """Base class of every method. The contract, hook by hook (the README's "Adding a method" has a
    worked example of what `score` receives and returns):

    Per cell, in this order (SPEC 2: every segment is scored before the method may adapt on it):
    - `prepare(data)`: once, with a tta_bench.prepare.prepared.PrepareData, never the evaluated split
      (its load, features, segments and cached); nothing it computes is charged per scored token.
    - `reset()`: at the start, and at every document boundary under reset `document`: back to the
      state prepare left.
    - `score(seg)` (abstract): a Segment whose `targets` is None; returns the (seg.n, vocab)
      log-probabilities of the segment's targets, each a full normalised distribution.
    - `adapt(seg)`: the same Segment once scored, `targets` filled in; learn from it (default: nothing).
    - `close()`: at the end, also after an error: give the shared model back as it was found.

    What a setting is, asked of the class with typed params before anything runs:
    - `adapts_at_test_time(params)` (abstract, no default): True when the setting learns from the
      evaluated text as it reads it (a TTA row, set against `none` and its control); False for the
      base model or a control (prepared on the prepare split, then static).
    - `control(params)`: the setting with this one's preparation and without its test-time
      adaptation, as {"method": name, "params": {...}}; None: the control is `none`.
    - `given_files(params)`: files it reads besides the harness's data (their content joins the resume key).
    - `given_data(params)`: data it brings into prepare besides PrepareData, as run hashes of its tokens
      (refused when any shares a run with the evaluated stream).

    Class attributes: `Params` (a dataclass: the typed parameters a bench file sets), `quick_params`
    (overrides for a cheap run on the tiny model: the checks and the tests over every method use them),
    `check_variants` (more settings those also run), `claim` (what the method's paper claims, printed
    by `report`), `requires` (pip packages it imports beyond the harness's, recorded in provenance).

    Lanes (SPEC 2; `protocol.lanes: N` under reset `document`): N documents are scored side by side,
    each lane with its own state; when a lane's document ends, that lane resets and takes the next one.
    A method runs in lanes when `runs_in_lanes(params)` says so (default False: it runs with one lane
    and the run says so, so a one-lane method needs none of this). Such a method implements:
    - `open_lanes(n)`: n lanes, each in the state `reset()` leaves; `reset_lane(lane)` resets one.
    - `score_lanes(segs)`: one Segment per active lane (each with its `lane`), scored together; returns
      their (seg.n, vocab) log-probabilities in the same order. A lane's result must not depend on the
      other lanes (per-document NLL at any lane count within 1e-6 relative, tested for every built-in).
    - `adapt_lanes(segs)`: the same Segments once scored, targets filled in.
    `self.lm.hidden_lanes([seg.ids ...])` gives each input's hidden states from one batched forward,
    counted per input as one lane would count it, the padding under its own key. A method that adapts
    weights keeps each lane's copy with `tta_bench_methods._common.lanes.LaneWeights` (dynamic-eval's way).
    INPUT: segs = [Segment(ids=(1, 8), n=4, lane=0), Segment(ids=(1, 5), n=5, lane=1)] (lane 1's
    document has just begun). PRED: [(4, V) log-probabilities, (5, V) log-probabilities].

    FLOPs: forwards through `self.lm` (forward, hidden, logits, logprobs; `forward(ids, model=copy)`
    for a private copy of the model) are counted automatically. Anything else is the method's to
    report, or it is missing from the cell's FLOPs (under-counted, making the method look cheaper than
    it is): `self.ledger.record_forward(component, shape, counter)` for a module of its own the LM's
    counted forwards do not cover (`counter()` gives its fvcore count), and `self.ledger.add(key,
    flops)` for work a forward trace cannot see (backward, update, search). Forwards that
    are no part of scoring (statistics, bookkeeping) run under `with self.ledger.paused():`.
    """

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
        """The cell's FLOP ledger (tta_bench.protocol.flops.Ledger): what self.lm's forwards do not count goes here."""
        return self.lm.ledger

    def prepare(self, data) -> None:
        """Build state from a non-evaluated split (statistics, training, a datastore)."""

    def reset(self) -> None:
        """Return to the state after prepare (document boundaries under reset=document)."""

    @abc.abstractmethod
    def score(self, seg: Segment):
        """(seg.n, vocab) log-probabilities of the segment's targets, from seg.ids only (seg.targets is None)."""

    def adapt(self, seg: Segment) -> None:
        """Learn from a segment that has been scored."""

    # -- lanes (see the class docstring): only for a method whose runs_in_lanes(params) is True ------
    @classmethod
    def runs_in_lanes(cls, params) -> bool:
        """Whether this setting implements the lane hooks below (False: one lane, whatever the bench asks)."""
        return False

    def open_lanes(self, n: int) -> None:
        """n lanes, each in the state reset() leaves."""
        raise NotImplementedError(f"{type(self).__name__} says it runs in lanes but has no open_lanes()")

    def reset_lane(self, lane: int) -> None:
        """Lane `lane` back to the state after prepare (its next document begins)."""
        raise NotImplementedError(f"{type(self).__name__} says it runs in lanes but has no reset_lane()")

    def score_lanes(self, segs: list[Segment]) -> list:
        """Each segment's (seg.n, vocab) log-probabilities, in order, each from its own lane's state."""
        raise NotImplementedError(f"{type(self).__name__} says it runs in lanes but has no score_lanes()")

    def adapt_lanes(self, segs: list[Segment]) -> None:
        """Learn from scored segments, each in its own lane (default: nothing)."""

    def close(self) -> None:
        """End of the cell (always called, also after an error): give the shared model back as it was
        found (weights, requires_grad), since the runner reuses one loaded LM across cells."""

    # -- controls (SPEC 3): what a test-time adaptation gain is measured against ---------------------
    @classmethod
    @abc.abstractmethod
    def adapts_at_test_time(cls, params) -> bool:
        """Whether this setting learns from the evaluated text as it reads it (False: the base model,
        or a control: prepared on the prepare split, then static). No default: a method says which."""

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
        of its tokens: tta_bench.checks.separation.stream_runs), e.g. a given checkpoint's recorded
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


# Why each abstract hook must be there, for the one line that refuses a method without it.
_REQUIRED = {
    "score": "every method must score a segment",
    "adapts_at_test_time": "every method must say whether it learns from the evaluated text"
    " (True: set against its control; False: the base model or a control)",
}


def method_class(name: str) -> type[Method]:
    """The Method subclass registered as `name`; one line naming its file when it is no Method or
    leaves an abstract hook out."""
    from tta_bench.api.registry import get

    cls = get("method", name)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TTABenchError(f"method '{name}' is registered as {cls!r}, which is not a tta_bench Method subclass")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        hooks = " or ".join(f"{m}()" for m in missing)
        why = "; ".join(_REQUIRED.get(m, "its base class declares it abstract") for m in missing)
        raise TTABenchError(f"method '{name}' ({_source(cls)}) does not implement {hooks}; {why}")
    return cls


def _source(cls) -> str:
    import inspect

    try:
        return inspect.getsourcefile(cls) or cls.__module__
    except TypeError:
        return cls.__module__
