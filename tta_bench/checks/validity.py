"""Validity checks (SPEC 6), on a short stream cut from the evaluated split, for `tta-bench check`,
`run --check` and the tests over every registered method. Each failure is one line naming where
(position, document, token; file; split) and how large.

- causality: tokens from t on perturbed (t at a segment boundary, inside a segment, at a document
  boundary; both reset policies); no distribution at a position <= t may move beyond `atol`.
- normalisation: every scored distribution sums to 1 (|logsumexp| <= `norm_tol`).
- split separation: prepare gets the prepare split only (cells.prepare_data refuses the evaluated
  one); no phase of the cell (prepare, reset, score, adapt) opens a file the task reads only for the
  evaluated split (audit hook); what prepare loaded shares no runs of `overlap_k` tokens with the
  evaluated stream (SPEC 2: none at all; `run` refuses such a cell before it starts: separation.py).
- determinism: two fresh instances give the same nll_sum on CPU, and so does one after reset().
- isolation: after close() the shared model has its weights and requires_grad flags back.

Each check is a function of what it judges, returning its details and problems; `check_method` runs
them on instances of the method, in the order `_steps` writes down, sharing one `CheckRun`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

from tta_bench.api.errors import TTABenchError
from tta_bench.checks.probes import (
    CheckData,
    CheckInstance,
    Snapshot,
    doc_offsets,
    jsonable,
    max_change,
    perturbed,
    shared_runs,
    where,
)
from tta_bench.protocol.flops import Ledger, charging

CHECKS = ("causality", "normalisation", "split_separation", "determinism", "isolation")
PHASES = ("prepare", "reset", "score", "adapt")  # the phases of a cell whose file reads split separation audits


@dataclass
class CheckSettings:
    segment_len: int = 16
    context_len: int = 16
    atol: float = 1e-4  # causality: largest change of a log-probability that counts as float noise
    norm_tol: float = 1e-4  # normalisation: |logsumexp| allowed
    nll_rtol: float = 1e-9  # determinism: relative difference of nll_sum allowed (float64 summation order)
    overlap_k: int = 32  # split separation: length of a token run shared by P and E that counts as overlap

    @property
    def doc_lengths(self) -> tuple[int, int, int]:
        """The check stream: a document of 2.5 segments, one of 1.5 and a short one."""
        s = self.segment_len
        return (2 * s + s // 2, s + s // 2, max(1, s // 2))


# -- the checks: each takes what it judges and returns its details and problems -------------------
def causality(change, reset: str, at: str, t: int, offsets: list[int], atol: float) -> tuple[dict, list[str]]:
    """One perturbation case: `change` is, per position <= t, the largest change of its distribution
    when tokens from t on were perturbed. (the case's details, its problems)."""
    bad = (change > atol).nonzero().flatten().tolist()
    case = {"reset": reset, "t": t, "at": at, "max_change": float(change.max()), "changed_positions": bad}
    if not bad:
        return case, []
    first, worst = bad[0], int(change.argmax())
    what = "the token it predicts" if first == t else f"tokens after it (from {t} on)"
    return case, [
        f"reset={reset}, t={t} {at}: the distribution at {where(offsets, first)} changed by up to"
        f" {float(change[first]):.4g} (log-probability; tolerance {atol:g}) when tokens from {t} on were"
        f" perturbed, so it depends on {what}; {len(bad)} of {t + 1} positions <= t changed, the most"
        f" ({float(change[worst]):.4g}) at {where(offsets, worst)}; score each token from earlier tokens"
        " only, and adapt only after scoring"
    ]


def causality_cases(segment_len: int, offsets: list[int]) -> list[tuple[str, int]]:
    """(where t lies, t) for each perturbation: a segment boundary, inside a segment, a document boundary."""
    S = segment_len
    return [("at a segment boundary", S), ("inside a segment", S + S // 2), ("at a document boundary", offsets[1])]


def normalisation(rows, reset: str, offsets: list[int], norm_tol: float) -> tuple[dict, list[str]]:
    """Every row of log-probabilities sums to 1. (details for this reset policy, problems)."""
    import torch

    lse = torch.logsumexp(rows.double(), -1)
    off = (~torch.isfinite(lse)) | (lse.abs() > norm_tol)
    worst = float(torch.nan_to_num(lse.abs(), nan=math.inf).max())
    details = {"positions": len(lse), "max_abs_logsumexp": worst}
    if not off.any():
        return details, []
    i = int(off.nonzero()[0])
    return details, [
        f"reset={reset}: at {where(offsets, i)} the distribution sums to {math.exp(float(lse[i])):.6g}"
        f" (logsumexp {float(lse[i]):+.4g}, tolerance {norm_tol:g}); {int(off.sum())} of {len(lse)}"
        f" positions are off by up to {worst:.4g}; return log-probabilities (log_softmax) over the full"
        " vocabulary"
    ]


def nll_difference(a: tuple, b: tuple, offsets: list[int], nll_rtol: float) -> str | None:
    """How two evaluations (nll_sum, rows) of one stream differ, or None when their nll_sums agree."""
    (nll_a, rows_a), (nll_b, rows_b) = a, b
    if abs(nll_a - nll_b) <= nll_rtol * max(1.0, abs(nll_a)):
        return None
    change = max_change(rows_a, rows_b)
    i = int((change > 0).nonzero()[0]) if (change > 0).any() else 0
    return (
        f"nll_sum {nll_a!r} and {nll_b!r} (difference {abs(nll_a - nll_b):.3g}); the first difference is at"
        f" {where(offsets, i)}, up to {float(change[i]):.3g} in log-probability"
    )


def determinism(
    first: tuple, again: tuple, second: tuple, device: str, seed: int, offsets: list[int], nll_rtol: float
) -> tuple[dict, list[str] | None]:
    """`first` and `again`: one instance's evaluations before and after reset(); `second`: a second fresh
    instance's. (details, problems), problems None when skipped (SPEC 6 asks it on CPU only)."""
    details = {"nll_sum": [first[0], second[0]], "nll_sum_after_reset": again[0], "device": device}
    if device != "cpu":
        details["skipped"] = "SPEC 6 asks for determinism on CPU; run `tta-bench check` (CPU by default)"
        return details, None
    problems = []
    msg = nll_difference(first, second, offsets, nll_rtol)
    if msg:
        problems.append(
            f"two fresh runs with seed {seed} gave {msg}; draw every random choice from the cell's seed"
            " (torch, numpy and random are seeded before the method is made)"
        )
    msg = nll_difference(first, again, offsets, nll_rtol)
    if msg:
        problems.append(
            f"evaluating the stream again on the same prepared method gave {msg}; reset() must return to"
            " the state after prepare"
        )
    return details, problems


def files_opened(instances: list[CheckInstance], evaluated_files: set[str], data: CheckData) -> list[str]:
    """Split separation by files: a problem for each file only the evaluated split reads that a phase opened."""
    problems = []
    for phase in PHASES:
        opened = set().union(*(inst.opened_in.get(phase, set()) for inst in instances))
        for path in sorted(opened & evaluated_files):
            problems.append(
                f"{phase} opened {path} ({os.path.getsize(path)} bytes), a file the task reads for the"
                f" evaluated split '{data.split}' (and not for '{data.prep}'); a method reads data only"
                " through PrepareData.load() and the segments it is given"
            )
    return problems


def prepare_overlap(data: CheckData, overlap_k: int) -> tuple[list[int], list[str]]:
    """Split separation by content: ([tokens prepare loaded in runs shared with the evaluated stream,
    tokens it loaded], problems)."""
    evaluated = data.evaluated_stream()
    problems, shared, total = [], 0, 0
    for st in {st.fingerprint: st for st in data.loads}.values():  # each prepare loads it again
        if st.split == data.split:
            problems.append(f"PrepareData.load served the evaluated split '{data.split}'")
        a, b = shared_runs(st, evaluated, overlap_k)
        shared, total = shared + a, total + b
    if shared:
        problems.append(
            f"{shared} of the {total} tokens prepare loaded from '{data.prep}' ({shared / total:.1%}) lie"
            f" in runs of {overlap_k} tokens that also occur in the evaluated split '{data.split}'; the two"
            " splits hold the same text: point them at disjoint data"
        )
    return [shared, total], problems


# -- what the steps of one check_method share -----------------------------------------------------
def _all_passing() -> dict:
    return {c: {"passed": True, "problems": [], "details": {}} for c in CHECKS}


@dataclass
class CheckRun:
    """One method setting under check: the instances made of it (all closed at the end, after an
    error too), the snapshot of the shared model they are checked against (isolation), and the
    results of every check."""

    lm: object
    cls: type
    params: object
    seed: int
    settings: CheckSettings
    data: CheckData
    snapshot: Snapshot
    instances: list[CheckInstance] = dataclasses.field(default_factory=list)
    results: dict = dataclasses.field(default_factory=_all_passing)  # the report's "checks"

    def fail(self, check: str, problems: list[str]) -> None:
        """Each of `problems` fails `check`, named after the method."""
        for msg in problems:
            self.results[check]["passed"] = False
            self.results[check]["problems"].append(f"{check} ({self.cls.registry_name}): {msg}")

    def new(self, reset: str) -> CheckInstance:
        """A fresh prepared instance under reset policy `reset`."""
        from tta_bench.protocol.evaluate import Protocol

        protocol = Protocol(self.settings.segment_len, self.settings.context_len, reset)
        inst = CheckInstance(self.cls, self.params, self.lm, self.seed, protocol, self.data)
        self.instances.append(inst)
        return inst

    def close(self, inst: CheckInstance) -> None:
        """Isolation: close `inst`, then the shared model must be as before (and is made so)."""
        inst.close()
        problems = self.snapshot.problems_and_restore()
        if self.results["isolation"]["passed"]:  # the first instance tells it; later ones repeat it
            self.fail("isolation", problems)

    def close_all(self) -> None:
        """Every instance closed and the shared model restored, whatever happened."""
        for inst in self.instances:
            inst.close()
        self.snapshot.problems_and_restore()


# -- the steps -------------------------------------------------------------------------------------
def _steps(run: CheckRun):
    """Every check of `run`, in the order they must run; returns the check stream.

    1. The files only the evaluated split reads are found before any instance exists.
    2. The first instance (reset=document) is prepared before the check stream is cut from the evaluated split.
    3. On it: the base run (normalisation), the same stream again (does reset() return to the prepared
       state?), then causality on it when reset() works; it is closed (isolation) before any other
       instance is made, as they all share the model; when reset() does not work, causality runs each
       perturbation on a fresh instance instead.
    4. Determinism: a second fresh instance, against the first one's runs.
    5. reset=never: one instance, base run (normalisation) and causality as in 3.
    6. Split separation last: it audits what every phase of every instance opened and what prepare loaded.
    """
    evaluated_files = run.data.evaluated_files()  # 1
    first = run.new("document")  # 2
    stream = run.data.check_stream(run.settings.doc_lengths)
    offsets = doc_offsets(stream)
    base = _base_run(run, first, stream, offsets, "document")  # 3
    again = first.run(stream)
    reset_works = nll_difference(base, again, offsets, run.settings.nll_rtol) is None
    _causality_then_close(run, first, stream, offsets, base[1], reset_works)
    second = run.new("document")  # 4
    other = second.run(stream)
    run.close(second)
    _record_determinism(run, base, again, other, offsets)
    never = run.new("never")  # 5
    never_base = _base_run(run, never, stream, offsets, "never")
    _causality_then_close(run, never, stream, offsets, never_base[1], reset_works)
    _record_split_separation(run, evaluated_files)  # 6
    return stream


def _base_run(run: CheckRun, inst: CheckInstance, stream, offsets, reset: str) -> tuple:
    """The unperturbed evaluation (nll_sum, rows), its rows checked for normalisation."""
    base = inst.run(stream)
    details, problems = normalisation(base[1], reset, offsets, run.settings.norm_tol)
    run.results["normalisation"]["details"][reset] = details
    run.fail("normalisation", problems)
    return base


def _causality_then_close(run: CheckRun, inst: CheckInstance, stream, offsets, base_rows, reuse: bool) -> None:
    """Causality for inst's reset policy, on `inst` when `reuse` (reset() works), else on a fresh
    instance per case, made only after `inst` is closed."""
    if reuse:
        _causality(run, inst, inst.reset, stream, offsets, base_rows)
    run.close(inst)
    if not reuse:
        _causality(run, None, inst.reset, stream, offsets, base_rows)


def _causality(run: CheckRun, inst: CheckInstance | None, reset: str, stream, offsets, base_rows) -> None:
    """Each perturbation case on `inst`, or on a fresh instance each when `inst` is None."""
    s = run.settings
    for at, t in causality_cases(s.segment_len, offsets):
        run_on = inst or run.new(reset)
        change = run_on.run(perturbed(stream, t, run.lm.vocab_size, run.seed), base_rows, t)[1][: t + 1]
        if inst is None:
            run.close(run_on)
        case, problems = causality(change, reset, at, t, offsets, s.atol)
        run.results["causality"]["details"].setdefault("cases", []).append(case)
        run.fail("causality", problems)


def _record_determinism(run: CheckRun, first: tuple, again: tuple, second: tuple, offsets) -> None:
    details, problems = determinism(first, again, second, run.lm.device.type, run.seed, offsets, run.settings.nll_rtol)
    run.results["determinism"]["details"] = details
    if problems is None:
        run.results["determinism"]["passed"] = None
    else:
        run.fail("determinism", problems)


def _record_split_separation(run: CheckRun, evaluated_files: set[str]) -> None:
    data = run.data
    details = {
        "evaluated_split": data.split,
        "prepare_split": data.prep,
        "evaluated_files": sorted(evaluated_files),
        "loads": [
            {"split": st.split, "docs": len(st.docs), "tokens": st.n_tokens}  # one per prepare
            for st in data.loads
        ],
    }
    run.results["split_separation"]["details"] = details
    run.fail("split_separation", files_opened(run.instances, evaluated_files, data))
    if data.loads:
        details["shared_tokens"], problems = prepare_overlap(data, run.settings.overlap_k)
        run.fail("split_separation", problems)


# -- one method setting ----------------------------------------------------------------------------
def check_method(
    lm,
    method,
    params=None,
    task: dict | None = None,
    seed: int = 0,
    limits: dict | None = None,
    settings: CheckSettings | None = None,
) -> dict:
    """Run every check for one method setting on `lm`; return a report (JSON-ready).

    method: a registered name or a Method subclass; params: a dict of parameter values (validated)
    or a Params instance; task: a resolved task entry (name, split, prepare_split, params) as in a
    cell; limits: the cell's limits on the evaluated split (for the overlap test). The steps and
    their order: _steps."""
    s = settings or CheckSettings()
    cls, params = _method_and_params(method, params)
    if task is None:
        raise TTABenchError("the checks need a task entry (name, split, prepare_split, params)")
    if s.context_len + s.segment_len - 1 > lm.window:
        raise TTABenchError(
            f"check segment_len + context_len - 1 exceeds the window of {lm.name} ({lm.window}); lower them"
        )
    t_start = time.perf_counter()
    data = CheckData(lm, task, limits)
    # every pass computed afresh (no shared passes): determinism must compare two real runs
    passes, lm.passes = lm.passes, None
    with charging(lm, Ledger(lm.fingerprint, enabled=False)):  # checks cost nothing on the cell's bill
        run = CheckRun(lm, cls, params, seed, s, data, Snapshot(lm.model))
        try:
            stream = _steps(run)
        finally:  # after an error too: the shared model goes back as it was
            run.close_all()
            lm.passes = passes
    passed = all(r["passed"] is not False for r in run.results.values())
    return {
        "passed": passed,
        "method": cls.registry_name,
        "params": jsonable(dataclasses.asdict(params)),
        "model": lm.name,
        "device": str(lm.device),
        "seed": seed,
        "protocol": {"segment_len": s.segment_len, "context_len": s.context_len, "resets": ["document", "never"]},
        "task": {"name": task["name"], "split": data.split, "prepare_split": data.prep},
        "doc_tokens": [len(d.ids) for d in stream.docs],
        "checks": run.results,
        "seconds": time.perf_counter() - t_start,
    }


def _method_and_params(method, params):
    """(the Method class, its Params): a registered name or a class; a dict of values (validated) or Params."""
    from tta_bench.api.method import method_class

    cls = method_class(method) if isinstance(method, str) else method
    if params is None or isinstance(params, dict):
        params, errs = cls.make_params(params or {})
        if errs:
            raise TTABenchError(errs[0])
    return cls, params


# -- command line and runner --------------------------------------------------------------------
def bench_settings(cfg, only_bench: bool = False, full_params: bool = False) -> list[tuple[str, dict, dict]]:
    """(method name, params to check, params as the bench gives them) for every method setting of the
    bench (each setting of a `select_on` grid), then every other registered method with its defaults
    and with each of its discrete options (option_variants); each method's quick_params applied on
    top unless full_params."""
    from tta_bench.api.method import method_class
    from tta_bench.api.registry import REGISTRIES, normalize

    given = []
    for m in cfg.methods:
        for g in m.get("grid") or [{}]:
            given.append((m["name"], {**m["params"], **g}))
    if not only_bench:
        named = {normalize(n) for n, _ in given}
        for e in sorted(REGISTRIES["method"].entries.values(), key=lambda e: e.name):
            if normalize(e.name) not in named:
                given += [(e.name, o) for o in [{}] + option_variants(method_class(e.name))]
    out, seen = [], set()
    for name, params in given:
        quick = {} if full_params else dict(getattr(method_class(name), "quick_params", {}) or {})
        checked = {**params, **quick}
        key = (normalize(name), json.dumps(checked, sort_keys=True, default=repr))
        if key not in seen:
            seen.add(key)
            out.append((name, checked, params))
    return out


def option_variants(cls) -> list[dict]:
    """Each discrete option of a method on its own (every other value of a Literal or bool parameter,
    the rest at defaults): the settings whose code paths differ most, for the tests over every method."""
    import typing

    hints = typing.get_type_hints(cls.Params)
    out = []
    for name, field in cls.param_fields().items():
        tp = hints[name]
        values = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else (True, False) if tp is bool else ()
        default = field.default
        out += [{name: v} for v in values if v != default and name not in cls.quick_params]
    out += [v for v in cls.check_variants if v not in out]
    return [o for o in out if not cls.make_params(o)[1]]  # only values the method accepts (fwl-static: fast false)


def failures(report: dict) -> list[str]:
    """Every problem of a report, or its error."""
    if report.get("error"):
        return [f"error: {report['error']}"]
    return [p for r in report["checks"].values() for p in r["problems"]]


def run_checks(
    path: str,
    model: str = "tiny",
    device: str = "cpu",
    only_bench: bool = False,
    full_params: bool = False,
    json_path: str | None = None,
    log=print,
) -> bool:
    """`tta-bench check`: every method setting of the bench file (and, unless only_bench, every other
    registered method) on `model`, on the bench's first task; True when all pass."""
    from tta_bench.protocol.models import load_model
    from tta_bench.run import config as config_mod

    cfg = config_mod.load(path)
    task, seed = cfg.tasks[0], cfg.seeds[0]
    settings = bench_settings(cfg, only_bench, full_params)
    t0 = time.perf_counter()
    lm = load_model(model, device=device, dtype="float32")
    s = CheckSettings()
    CheckData(lm, task).check_stream(s.doc_lengths)  # a task too short for the checks: one error, not one per method
    log(
        f"checking {len(settings)} method setting(s) on {lm.name} ({lm.device}), task {task['name']}:{task['split']}"
        f" (prepare: {task['prepare_split']}), seed {seed}; segment_len {s.segment_len}, context_len {s.context_len},"
        f" resets document and never" + ("" if full_params else "; each method's quick_params applied")
    )
    reports = _check_each(lm, settings, task, seed, cfg.limits, s, log)
    n_bad = sum(not r["passed"] for r in reports)
    log(
        f"{len(reports)} setting(s) checked in {time.perf_counter() - t0:.1f}s: {len(reports) - n_bad} passed, {n_bad} failed"
    )
    if json_path:
        from pathlib import Path

        from tta_bench.results.files import atomic_write

        atomic_write(Path(json_path), json.dumps(reports, indent=1))
        log(f"wrote {json_path}")
    return n_bad == 0


def _check_each(lm, settings, task: dict, seed: int, limits: dict, s: CheckSettings, log) -> list[dict]:
    """check_method on each (name, params, params as given) of `settings`, each outcome logged as it
    comes; the reports, each with its label."""
    from tta_bench.run.config import method_label

    reports, width = [], max(len(method_label(n, g)) for n, _, g in settings)
    for name, params, given in settings:
        label = method_label(name, given)
        try:
            rep = check_method(lm, name, params, task, seed, limits, s)
        except Exception as e:  # a method that crashes fails its checks; the others still run
            rep = {"passed": False, "method": name, "params": jsonable(params), "error": f"{type(e).__name__}: {e}"}
        rep["label"] = label
        reports.append(rep)
        for line in outcome_lines(rep, width):
            log(line)
    return reports


def outcome_lines(report: dict, width: int) -> list[str]:
    """What `tta-bench check` prints for one report: its label (padded to `width`), its outcome, and
    the first problem of each check that has any (--json has them all)."""
    label = report["label"]
    if report.get("error"):
        return [f"  {label:<{width}}  ERROR  {report['error']}"]
    failed = [c for c, r in report["checks"].items() if r["passed"] is False]
    skipped = [c for c, r in report["checks"].items() if r["passed"] is None]
    status = "ok   " if not failed else "FAIL "
    note = ("failed: " + ", ".join(failed)) if failed else "all checks pass"
    note += f" (skipped: {', '.join(skipped)})" if skipped else ""
    lines = [f"  {label:<{width}}  {status} {note}  [{report['seconds']:.1f}s]"]
    for r in report["checks"].values():
        if r["problems"]:
            more = f" (and {len(r['problems']) - 1} more)" if len(r["problems"]) > 1 else ""
            lines.append(f"      {r['problems'][0]}{more}")
    return lines


def check_cell(cell, record: dict, lm) -> dict:
    """`run --check`: the checks for the setting a cell evaluated (its model, resolved parameters,
    task and seed), stored in the cell record's "checks"."""
    params = record["resolved"]["method_params"]
    try:
        return check_method(lm, cell.method["name"], params, cell.task, cell.seed, cell.limits)
    except Exception as e:  # recorded, not raised: the cell's own result stands
        return {"passed": False, "method": cell.method["name"], "error": f"{type(e).__name__}: {e}"}
