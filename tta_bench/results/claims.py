"""What a study's setting gives each method, and the papers' claims set beside what it measured
(SPEC 4 "What a study must give each method", SPEC 9): the report's "Setting" and "Against the
papers' claims" sections. A claim is set beside a measurement only with whether this setting can
test it, and why not, in the setting's own numbers."""

from __future__ import annotations

import math

import numpy as np

from tta_bench.api.errors import TTABenchError
from tta_bench.results.records import CellRecord

BOUNDS = {">=": lambda x, b: x >= b - 0.005, "<=": lambda x, b: x <= b + 0.005}  # a ratio printed as 3.00 is 3x
SMALL_DATASTORE = 1_000_000  # keys; the kNN-LM paper's has 103M


def mean_context(tokens: list[int], segment: int, context: int) -> float:
    """Mean number of earlier tokens of its document the model sees when scoring a token (SPEC 2: a
    full segment sees `context` earlier tokens, a shorter last one correspondingly more)."""
    seen = 0.0
    for n in tokens:
        for start in range(0, n, segment):
            length = min(segment, n - start)
            before = min(start, context + segment - length)
            seen += length * before + length * (length - 1) / 2
    return seen / max(1, sum(tokens))


def _training(rec: CellRecord) -> list[dict]:
    """The trained states a cell used: steps, best step, what stopped training, the learned step sizes."""
    out = []
    cap = (rec.resolved or {}).get("method_params", {}).get("train_steps")
    for e in (rec.prepare or {}).get("cache", []):
        info = e.get("info") or {}
        if not info.get("history"):
            continue
        stopped = info.get("stopped_by") or ("patience" if cap and info["steps"] < cap else "step cap")
        best = next((h for h in info["history"] if h["step"] == info.get("best_step")), info["history"][-1])
        eta = {k: float(np.mean(v)) for k, v in (best.get("eta") or {}).items()}
        out.append(
            {
                "kind": e["kind"],
                "steps": info["steps"],
                "best_step": info.get("best_step"),
                "stopped_by": stopped,
                "eta": eta,
            }
        )
    return out


def setting(rec: CellRecord) -> dict:
    """One cell's setting, computed from its record."""
    res, t = rec.resolved, rec.doc_tokens
    segs = [math.ceil(n / res["segment_len"]) for n in t]
    adapts = bool((rec.role or {}).get("test_time"))
    steps = [s - 1 for s in segs] if res["reset"] == "document" else [sum(segs) - 1]
    keys = None
    if "datastore_tokens" in res["method_params"]:
        keys = sum(e.get("tokens", 0) for e in (rec.prepare or {}).get("cache", []) if e.get("kind") == "features")
    return {
        "documents": len(t),
        "tokens": sum(t),
        "reset": res["reset"],
        "adapts": adapts,
        "steps_min": min(steps) if adapts else None,
        "steps_mean": float(np.mean(steps)) if adapts else None,
        "mean_context": mean_context(t, res["segment_len"], res["context_len"]),
        "datastore_keys": keys,
        "training": _training(rec),
    }


def setting_text(s: dict) -> str:
    parts = [f"{s['documents']} documents", f"mean base context {s['mean_context']:.0f}"]
    if s["adapts"]:
        parts.append(f"adaptation steps per document: min {s['steps_min']}, mean {s['steps_mean']:.1f}")
    if s["datastore_keys"] is not None:
        parts.append(f"datastore keys {s['datastore_keys']:,}")
    parts += [f"{t['kind']}: {t['steps']} steps, stopped by {t['stopped_by']}" for t in s["training"]]
    return "; ".join(parts)


def testable(s: dict, claim_setting: str) -> tuple[str, str]:
    """('yes' | 'partly' | 'no', the reasons from the setting)."""
    no, partly = [], []
    if s["adapts"]:
        steps = f"adaptation steps per document: {s['steps_min']}" + (
            f" (mean {s['steps_mean']:.1f})" if s["steps_mean"] != s["steps_min"] else ""
        )
        if s["steps_min"] == 0:
            no.append(steps)
        elif s["steps_min"] < 3:  # SPEC 4: at least 3 useful steps in every document
            partly.append(steps)
        if s["reset"] == "document" and "stream" in claim_setting:
            partly.append("reset per document (the paper reads one continuous stream)")
    if s["datastore_keys"] is not None and s["datastore_keys"] < SMALL_DATASTORE:
        partly.append(f"datastore keys: {s['datastore_keys']:,}")
    for t in s["training"]:
        if t["stopped_by"] != "patience":
            partly.append(f"{t['kind']} training stopped at the step cap ({t['steps']} steps), not on a plateau")
    if s["training"] and "jointly" in claim_setting:
        partly.append("trained on top of a pretrained base, not jointly with it")
    verdict = "no" if no else "partly" if partly else "yes"
    return verdict, "; ".join(no + partly) or "the setting meets the paper's conditions"


def _measured(r: dict) -> tuple[dict | None, str]:
    d = r["vs_control"] if r["kind"] == "TTA" else r["vs_none"]
    return d, (r["control"] if r["kind"] == "TTA" else "none")


# A gain smaller than this (0.5% in perplexity) is no support for a paper's claim of a large one.
NEGLIGIBLE = 0.005


def _consistent(verdict: str, d: dict | None, n_docs: int) -> str:
    if verdict == "no":
        return "not testable here"
    if d is None or d["delta_nll"] is None:
        return "n/a"
    # a static method's difference to none is no declared contrast: judged by its unadjusted interval
    sure, note = (d["significant"], "") if d["declared"] else (d["excludes_zero"], " (unadjusted)")
    if sure and d["delta_nll"] <= -NEGLIGIBLE:
        return "consistent: a significant gain" + note
    if sure and d["delta_nll"] < 0:  # every claim in the table is of a sizeable gain
        return f"not consistent: a significant but negligible gain (under {NEGLIGIBLE} nats/token)" + note
    if sure:
        return "not consistent: significantly worse" + note
    return f"no significant effect at {n_docs} documents"


def claim_rows(table: list[dict], settings: dict[str, dict], names: dict[str, str], gains: dict[str, str]) -> list[str]:
    """The claims table's Markdown rows: one per method with a claim, then the cost claims (a method's
    `claim_cost`: the paper's words, and the bound on FLOPs × none they are read as)."""
    from tta_bench.api.method import method_class
    from tta_bench.results.render import delta_text

    out = [
        "| method | paper's claim | paper's setting | this study's setting | testable here | measured ΔNLL/token vs control [95% CI] | consistent | gains most (significant vs control) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    costs = []
    for r in table:
        try:
            cls = method_class(names[r["method"]])
        except (KeyError, TTABenchError):  # a failed row, or a method no longer registered
            continue
        if not getattr(cls, "claim", "") or r.get("status") == "failed":
            continue
        s = settings[r["method"]]
        paper = getattr(cls, "claim_setting", "") or "—"
        verdict, why = testable(s, paper)
        d, ref = _measured(r)
        measured = f"{delta_text(d, 'nll')} vs {ref}" if d else "n/a"
        out.append(
            f"| {r['method']} | {cls.claim} | {paper} | {setting_text(s)} | {verdict}: {why} | {measured} |"
            f" {_consistent(verdict, d, s['documents'])} | {gains.get(r['method'], '—')} |"
        )
        cost = getattr(cls, "claim_cost", None)  # (the paper's words, ">=" or "<=", FLOPs x none)
        if cost and r["flops_x_none"] is not None:
            claim, x, t = cost[0], r["flops_x_none"], r["time_x_none"]
            holds = BOUNDS[cost[1]](x, cost[2])
            costs.append(
                f"| {r['method']} (cost) | {claim} | — | FLOPs × none {x:.2f}, time × none {'n/a' if t is None else format(t, '.2f')} |"
                f" yes: FLOPs are counted | {x:.2f}x the FLOPs of none | {'consistent' if holds else 'not consistent'} | — |"
            )
    return out + costs if len(out) + len(costs) > 2 else []
