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
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

from .errors import TTABenchError
from .probes import (CheckData, Snapshot, files_by_phase, jsonable, max_change, opened_files, perturbed, real_paths, rng_state, set_rng,
                     shared_runs)

CHECKS = ("causality", "normalisation", "split_separation", "determinism", "isolation")


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


# -- running a method ---------------------------------------------------------------------------
class _Instance:
    """One prepared method, built as every cell is (cells.build_cell); each evaluation starts from the same random state."""

    def __init__(self, cls, params, lm, seed, protocol, data: CheckData):
        from .cells import build_cell, prepare_data
        from .config import Cell

        cell = Cell({"name": lm.name}, data.entry, {"name": cls.registry_name, "params": dataclasses.asdict(params)}, seed,
                    {"segment_len": protocol.segment_len, "context_len": protocol.context_len, "reset": protocol.reset},
                    {}, str(lm.dtype).replace("torch.", ""), lm.device.type)
        prep = prepare_data(cell, lm, data.streams, on_load=data.loads.append)
        with opened_files() as opened:
            self.built = build_cell(cell, lm, data=prep, load_stream=False, count_flops=False)
        self.method = self.built.method
        self.opened_in = {"prepare": set(real_paths(opened))}  # phase -> files it opened
        self.rng = rng_state()

    def run(self, stream, base=None, t=None):
        """(nll_sum, rows): rows are all log-probabilities (N, V) in stream order; with `base` and t,
        rows[i] is instead the largest change against base[i] for i <= t (0 beyond t)."""
        import torch

        offsets = [0]
        for d in stream.docs:
            offsets.append(offsets[-1] + len(d.ids))
        V = self.method.lm.vocab_size
        rows = torch.zeros(offsets[-1]) if base is not None else torch.empty(offsets[-1], V)

        def observe(seg, logprobs, targets):
            a = offsets[seg.doc] + seg.start
            lp = logprobs.float().cpu()
            if base is None:
                rows[a:a + seg.n] = lp
            elif a <= t:
                b = min(a + seg.n, t + 1)
                rows[a:b] = max_change(lp[: b - a], base[a:b])

        set_rng(self.rng)
        with files_by_phase(self.method, ("reset", "score", "adapt"), self.opened_in):
            result = self.built.evaluate(observer=observe, stream=stream)
        return math.fsum(result.doc_nll), rows

    def close(self):
        self.built.close()


# -- the checks ---------------------------------------------------------------------------------
def check_method(lm, method, params=None, task: dict | None = None, seed: int = 0, limits: dict | None = None,
                 settings: CheckSettings | None = None) -> dict:
    """Run every check for one method setting on `lm`; return a report (JSON-ready).

    method: a registered name or a Method subclass; params: a dict of parameter values (validated)
    or a Params instance; task: a resolved task entry (name, split, prepare_split, params) as in a
    cell; limits: the cell's limits on the evaluated split (for the overlap test)."""
    import torch

    from .evaluate import Protocol
    from .flops import Ledger
    from .method import method_class

    s = settings or CheckSettings()
    cls = method_class(method) if isinstance(method, str) else method
    if params is None or isinstance(params, dict):
        params, errs = cls.make_params(params or {})
        if errs:
            raise TTABenchError(errs[0])
    if task is None:
        raise TTABenchError("the checks need a task entry (name, split, prepare_split, params)")
    if s.context_len + s.segment_len - 1 > lm.window:
        raise TTABenchError(f"check segment_len + context_len - 1 exceeds the window of {lm.name} ({lm.window}); lower them")
    t_start = time.perf_counter()
    data = CheckData(lm, task, limits)
    protocols = {r: Protocol(s.segment_len, s.context_len, r) for r in ("document", "never")}
    results = {c: {"passed": True, "problems": [], "details": {}} for c in CHECKS}

    def fail(check, msg):
        results[check]["passed"] = False
        results[check]["problems"].append(f"{check} ({cls.registry_name}): {msg}")

    saved_ledger = lm.ledger
    lm.ledger = Ledger(lm.fingerprint)
    lm.ledger.enabled = False  # checks cost nothing on the cell's bill
    snapshot = Snapshot(lm.model)
    instances = []

    def new(reset):
        inst = _Instance(cls, params, lm, seed, protocols[reset], data)
        instances.append(inst)
        return inst

    def done(inst):
        inst.close()
        problems = snapshot.problems_and_restore()
        if problems and results["isolation"]["passed"]:  # the first instance tells it; later ones repeat it
            for p in problems:
                fail("isolation", p)

    try:
        eval_files = data.evaluated_files()
        m1 = new("document")  # prepared before the evaluated stream is read
        stream = data.check_stream(s.doc_lengths)
        offsets = [0]
        for d in stream.docs:
            offsets.append(offsets[-1] + len(d.ids))

        def where(pos):
            d = bisect.bisect_right(offsets, pos) - 1
            return f"position {pos} (doc {d}, token {pos - offsets[d]})"

        S = s.segment_len
        cases = [("at a segment boundary", S), ("inside a segment", S + S // 2), ("at a document boundary", offsets[1])]
        base = {}

        def causality(reset, inst):
            """Each case on `inst`, or on a fresh instance when `inst` is None (reset() is unreliable)."""
            for at, t in cases:
                run_on = inst or new(reset)
                change = run_on.run(perturbed(stream, t, lm.vocab_size, seed), base[reset], t)[1][: t + 1]
                if inst is None:
                    done(run_on)
                bad = (change > s.atol).nonzero().flatten().tolist()
                results["causality"]["details"].setdefault("cases", []).append(
                    {"reset": reset, "t": t, "at": at, "max_change": float(change.max()), "changed_positions": bad})
                if bad:
                    first, worst = bad[0], int(change.argmax())
                    what = "the token it predicts" if first == t else f"tokens after it (from {t} on)"
                    fail("causality",
                         f"reset={reset}, t={t} {at}: the distribution at {where(first)} changed by up to"
                         f" {float(change[first]):.4g} (log-probability; tolerance {s.atol:g}) when tokens from {t} on were"
                         f" perturbed, so it depends on {what}; {len(bad)} of {t + 1} positions <= t changed, the most"
                         f" ({float(change[worst]):.4g}) at {where(worst)}; score each token from earlier tokens only,"
                         " and adapt only after scoring")

        def normalisation(rows, reset):
            lse = torch.logsumexp(rows.double(), -1)
            off = (~torch.isfinite(lse)) | (lse.abs() > s.norm_tol)
            worst = float(torch.nan_to_num(lse.abs(), nan=math.inf).max())
            results["normalisation"]["details"][reset] = {"positions": len(lse), "max_abs_logsumexp": worst}
            if off.any():
                i = int(off.nonzero()[0])
                fail("normalisation",
                     f"reset={reset}: at {where(i)} the distribution sums to {math.exp(float(lse[i])):.6g} (logsumexp"
                     f" {float(lse[i]):+.4g}, tolerance {s.norm_tol:g}); {int(off.sum())} of {len(lse)} positions are off"
                     f" by up to {worst:.4g}; return log-probabilities (log_softmax) over the full vocabulary")

        def differs(a, b, rows_a, rows_b):
            if abs(a - b) <= s.nll_rtol * max(1.0, abs(a)):
                return None
            change = max_change(rows_a, rows_b)
            i = int((change > 0).nonzero()[0]) if (change > 0).any() else 0
            return (f"nll_sum {a!r} and {b!r} (difference {abs(a - b):.3g}); the first difference is at {where(i)},"
                    f" up to {float(change[i]):.3g} in log-probability")

        # reset=document: base, the same instance again (reset), the perturbed runs
        nll1, base["document"] = m1.run(stream)
        normalisation(base["document"], "document")
        nll1b, rows1b = m1.run(stream)
        reset_ok = differs(nll1, nll1b, base["document"], rows1b) is None
        if reset_ok:
            causality("document", m1)
        done(m1)  # before any other instance: they share the model
        if not reset_ok:
            causality("document", None)
        # determinism: a second fresh instance with the same seed
        m2 = new("document")
        nll2, rows2 = m2.run(stream)
        done(m2)
        det = results["determinism"]
        det["details"] = {"nll_sum": [nll1, nll2], "nll_sum_after_reset": nll1b, "device": lm.device.type}
        if lm.device.type != "cpu":
            det["passed"] = None
            det["details"]["skipped"] = "SPEC 6 asks for determinism on CPU; run `tta-bench check` (CPU by default)"
        else:
            msg = differs(nll1, nll2, base["document"], rows2)
            if msg:
                fail("determinism", f"two fresh runs with seed {seed} gave {msg}; draw every random choice from the"
                                    " cell's seed (torch, numpy and random are seeded before the method is made)")
            msg = differs(nll1, nll1b, base["document"], rows1b)
            if msg:
                fail("determinism", f"evaluating the stream again on the same prepared method gave {msg}; reset() must"
                                    " return to the state after prepare")
        # reset=never
        m3 = new("never")
        base["never"] = m3.run(stream)[1]
        normalisation(base["never"], "never")
        if reset_ok:
            causality("never", m3)
        done(m3)
        if not reset_ok:
            causality("never", None)

        # split separation
        sep = results["split_separation"]
        sep["details"] = {"evaluated_split": data.split, "prepare_split": data.prep,
                          "evaluated_files": sorted(eval_files),
                          "loads": [{"split": st.split, "docs": len(st.docs), "tokens": st.n_tokens} for st in data.loads]}  # per prepare
        for phase in ("prepare", "reset", "score", "adapt"):
            opened = set().union(*(inst.opened_in.get(phase, set()) for inst in instances))
            for path in sorted(opened & eval_files):
                fail("split_separation",
                     f"{phase} opened {path} ({os.path.getsize(path)} bytes), a file the task reads for the evaluated split"
                     f" '{data.split}' (and not for '{data.prep}'); a method reads data only through PrepareData.load()"
                     " and the segments it is given")
        if data.loads:
            evaluated = data.evaluated_stream()
            shared = total = 0
            unique = {st.fingerprint: st for st in data.loads}.values()  # each prepare loads it again
            for st in unique:
                if st.split == data.split:
                    fail("split_separation", f"PrepareData.load served the evaluated split '{data.split}'")
                a, b = shared_runs(st, evaluated, s.overlap_k)
                shared, total = shared + a, total + b
            sep["details"]["shared_tokens"] = [shared, total]
            if shared:
                fail("split_separation",
                     f"{shared} of the {total} tokens prepare loaded from '{data.prep}' ({shared / total:.1%}) lie in runs"
                     f" of {s.overlap_k} tokens that also occur in the evaluated split '{data.split}'; the two splits"
                     " hold the same text: point them at disjoint data")
    finally:  # after an error too: the shared model goes back as it was
        for inst in instances:
            inst.close()
        snapshot.problems_and_restore()
        lm.ledger = saved_ledger
    passed = all(r["passed"] is not False for r in results.values())
    return {"passed": passed, "method": cls.registry_name, "params": jsonable(dataclasses.asdict(params)),
            "model": lm.name, "device": str(lm.device), "seed": seed,
            "protocol": {"segment_len": s.segment_len, "context_len": s.context_len, "resets": ["document", "never"]},
            "task": {"name": task["name"], "split": data.split, "prepare_split": data.prep},
            "doc_tokens": [len(d.ids) for d in stream.docs], "checks": results,
            "seconds": time.perf_counter() - t_start}


# -- command line and runner --------------------------------------------------------------------
def bench_settings(cfg, only_bench: bool = False, full_params: bool = False) -> list[tuple[str, dict, dict]]:
    """(method name, params to check, params as the bench gives them) for every method setting of the
    bench (each setting of a `select_on` grid), then every other registered method with its defaults
    and with each of its discrete options (option_variants); each method's quick_params applied on
    top unless full_params."""
    from .method import method_class
    from .registry import REGISTRIES, normalize

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
        out += [{name: v} for v in values if v != default and not (name in cls.quick_params)]
    out += [v for v in cls.check_variants if v not in out]
    return [o for o in out if not cls.make_params(o)[1]]  # only values the method accepts (fwl-static: fast false)


def failures(report: dict) -> list[str]:
    if report.get("error"):
        return [f"error: {report['error']}"]
    return [p for r in report["checks"].values() for p in r["problems"]]


def run_checks(path: str, model: str = "tiny", device: str = "cpu", only_bench: bool = False,
               full_params: bool = False, json_path: str | None = None, log=print) -> bool:
    """`tta-bench check`: every method setting of the bench file (and, unless only_bench, every other
    registered method) on `model`, on the bench's first task; True when all pass."""
    from . import config as config_mod
    from .config import method_label
    from .models import load_model

    cfg = config_mod.load(path)
    task, seed = cfg.tasks[0], cfg.seeds[0]
    settings = bench_settings(cfg, only_bench, full_params)
    t0 = time.perf_counter()
    lm = load_model(model, device=device, dtype="float32")
    s = CheckSettings()
    CheckData(lm, task).check_stream(s.doc_lengths)  # a task too short for the checks: one error, not one per method
    log(f"checking {len(settings)} method setting(s) on {lm.name} ({lm.device}), task {task['name']}:{task['split']}"
        f" (prepare: {task['prepare_split']}), seed {seed}; segment_len {s.segment_len}, context_len {s.context_len},"
        f" resets document and never" + ("" if full_params else "; each method's quick_params applied"))
    reports, width = [], max(len(method_label(n, g)) for n, _, g in settings)
    for name, params, given in settings:
        label = method_label(name, given)
        try:
            rep = check_method(lm, name, params, task, seed, cfg.limits, s)
        except Exception as e:  # a method that crashes fails its checks; the others still run
            rep = {"passed": False, "method": name, "params": jsonable(params), "error": f"{type(e).__name__}: {e}"}
        rep["label"] = label
        reports.append(rep)
        if rep.get("error"):
            log(f"  {label:<{width}}  ERROR  {rep['error']}")
            continue
        failed = [c for c, r in rep["checks"].items() if r["passed"] is False]
        skipped = [c for c, r in rep["checks"].items() if r["passed"] is None]
        status = "ok   " if not failed else "FAIL "
        note = ("failed: " + ", ".join(failed)) if failed else "all checks pass"
        note += f" (skipped: {', '.join(skipped)})" if skipped else ""
        log(f"  {label:<{width}}  {status} {note}  [{rep['seconds']:.1f}s]")
        for c, r in rep["checks"].items():  # the first problem of each check; --json has them all
            if r["problems"]:
                more = f" (and {len(r['problems']) - 1} more)" if len(r["problems"]) > 1 else ""
                log(f"      {r['problems'][0]}{more}")
    n_bad = sum(not r["passed"] for r in reports)
    log(f"{len(reports)} setting(s) checked in {time.perf_counter() - t0:.1f}s: {len(reports) - n_bad} passed, {n_bad} failed")
    if json_path:
        from pathlib import Path

        from .results import atomic_write

        atomic_write(Path(json_path), json.dumps(reports, indent=1))
        log(f"wrote {json_path}")
    return n_bad == 0


def check_cell(cell, record: dict, lm) -> dict:
    """`run --check`: the checks for the setting a cell evaluated (its model, resolved parameters,
    task and seed), stored in the cell record's "checks"."""
    params = record["resolved"]["method_params"]
    try:
        return check_method(lm, cell.method["name"], params, cell.task, cell.seed, cell.limits)
    except Exception as e:  # recorded, not raised: the cell's own result stands
        return {"passed": False, "method": cell.method["name"], "error": f"{type(e).__name__}: {e}"}
