"""`tta-bench report RESULTS_DIR`: where each method gains, from the per-token logs (tokenlog.py).

Every method is set against a baseline (`none` unless told otherwise) and against its control (SPEC 3)
on the same tokens: the difference in NLL per token (negative: the method is better), by bucket:
- frequency: the target's rank by frequency in the prepare split (the 1k most frequent, 1k-10k, rarer, unseen);
- occurrence: the target's first occurrence in its document, or a repeat;
- position in the document: under 128, 128-512, 512-2k, 2k and beyond.
Each bucket gets its mean difference with a paired t-interval over documents (metrics.py, as the
leaderboard's) and a Holm-adjusted p-value over its comparison's buckets. REPORT.md (with REPORT.json
holding the same numbers and the cell files they come from), with each table's setting and the
papers' claims set beside it (claims.py), and a plot of the gain against position against the
control per table are written into the results folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tta_bench.results import tokenlog
from tta_bench.api.errors import TTABenchError
from tta_bench.results.leaderboard import control_label, load_records, rows, table_key
from tta_bench.results.records import CellRecord
from tta_bench.results.plots import gain_curves
from tta_bench.results.render import slug
from tta_bench.results.files import atomic_write

FREQUENCY = [("top 1k", 0, 1000), ("1k-10k", 1000, 10000), ("rarer", 10000, math.inf)]  # and "unseen": rank -1
POSITION = [("< 128", 0, 128), ("128-512", 128, 512), ("512-2k", 512, 2048), (">= 2k", 2048, math.inf)]
PLOT_EDGES = [0, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def positions(log: dict) -> np.ndarray:
    """Each token's position in its document."""
    offsets = log["doc_offsets"]
    return np.arange(len(log["targets"])) - np.repeat(offsets[:-1], np.diff(offsets))


def nll_difference(log: dict, ref: dict) -> np.ndarray:
    """Per token, nll(log) - nll(ref): negative where `log` is better."""
    return ref["logprob"].astype(np.float64) - log["logprob"].astype(np.float64)


def buckets(log: dict) -> dict[str, np.ndarray]:
    """Per bucket name, a boolean mask over the log's tokens."""
    rank, targets, offsets = log["prep_rank"], log["targets"], log["doc_offsets"]
    position = positions(log)
    repeated = np.zeros(len(targets), bool)
    for a, b in zip(offsets[:-1], offsets[1:]):
        _, first = np.unique(targets[a:b], return_index=True)
        repeated[a:b] = True
        repeated[a + first] = False
    out = {f"frequency: {name}": (rank >= lo) & (rank < hi) for name, lo, hi in FREQUENCY}
    out["frequency: unseen"] = rank < 0
    out["occurrence: first"], out["occurrence: repeated"] = ~repeated, repeated
    out.update({f"position: {name}": (position >= lo) & (position < hi) for name, lo, hi in POSITION})
    return out


def compare(log: dict, ref: dict) -> dict:
    """Per bucket: tokens, mean NLL difference (log vs ref, nats per token), its paired interval over
    documents and p-value (metrics.ratio_interval on each document's sum and count in the bucket),
    and `significant`: Holm-adjusted p < 0.05 over this comparison's buckets, never on a zero-width
    interval."""
    from tta_bench.protocol.metrics import holm, ratio_interval

    if not (np.array_equal(log["targets"], ref["targets"]) and np.array_equal(log["doc_offsets"], ref["doc_offsets"])):
        raise TTABenchError("two per-token logs of one table score different tokens; rerun both cells")
    diff = nll_difference(log, ref)
    offsets = log["doc_offsets"]
    doc = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    n_docs, out = len(offsets) - 1, {}
    for name, mask in {"all": np.ones(len(diff), bool), **buckets(log)}.items():
        sums = np.bincount(doc[mask], diff[mask], minlength=n_docs)
        counts = np.bincount(doc[mask], minlength=n_docs).astype(np.float64)
        n = int(mask.sum())
        entry = {"tokens": n, "mean": None, "ci95": None, "p": None, "zero_width": False}
        if n:
            has = counts > 0  # documents without a token of the bucket say nothing about it
            r = ratio_interval(sums[has], counts[has])
            entry.update(mean=r["point"], ci95=r["ci"], p=r["p"], zero_width=r["zero_width"])
        out[name] = entry
    for entry, p in zip(out.values(), holm([e["p"] for e in out.values()])):
        entry.update(p_holm=p, significant=p is not None and p < 0.05 and not entry["zero_width"])
    return out


def by_position(log: dict, ref: dict) -> list[tuple[int, float]]:
    """(bin start, mean NLL difference) over PLOT_EDGES bins of position in the document."""
    position, diff = positions(log), nll_difference(log, ref)
    out = []
    for lo, hi in zip(PLOT_EDGES[:-1], PLOT_EDGES[1:] + [math.inf]):
        mask = (position >= lo) & (position < hi)
        if mask.any():
            out.append((lo, float(diff[mask].mean())))
    return out


def _fmt(entry: dict) -> str:
    if entry["mean"] is None:
        return "—"
    ci, star = entry["ci95"], "*" if entry["significant"] else ""
    return f"{entry['mean']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]{star}" if ci else f"{entry['mean']:+.4f}"


def write_report(results, against: str = "none") -> Path:
    """REPORT.md, REPORT.json and a plot per table in the results folder; returns REPORT.md's path."""
    run_dir = Path(results)
    records, _ = load_records([run_dir])
    for rec in records:
        why = tokenlog.problem(run_dir, rec)
        if why:
            raise TTABenchError(
                f"cell {rec.cell_id} ({rec.label}): {why}; rerun the bench with `run --log-tokens`"
                " (or log_tokens: true) to record them"
            )
    groups: dict[tuple, dict[str, CellRecord]] = {}
    for rec in records:  # one seed per setting: the first
        groups.setdefault(table_key(rec), {}).setdefault(rec.label, rec)
    lines = ["# Where each method gains", "", LEGEND.format(run_dir=run_dir), ""]
    data = {"against": against, "tables": []}
    tables = rows(records)
    for key, by_label in sorted(groups.items()):
        if against in by_label:
            section, entry = _table_section(run_dir, key, by_label, against, tables.get(key, []))
            lines += section
            data["tables"].append(entry)
    lines += _training(records)
    if not data["tables"]:
        raise TTABenchError(
            f"no table in {run_dir} has a '{against}' cell to set the others against; pass --against LABEL"
        )
    atomic_write(run_dir / "REPORT.json", json.dumps(data, indent=1))
    atomic_write(run_dir / "REPORT.md", "\n".join(lines) + "\n")
    return run_dir / "REPORT.md"


LEGEND = (
    "Generated by `python -m tta_bench report {run_dir}` from the per-token logs of the cells in `{run_dir}/cells/`."
    " Each entry is the mean difference in NLL per token (nats; negative: the method is better) on the tokens of"
    " a bucket, with a paired 95% t-interval over documents (the leaderboard's method, metrics.py); * marks a"
    " bucket whose p-value, Holm-adjusted over the buckets of its comparison, is below 0.05, never a zero-width"
    " interval. Frequency ranks come from the prepare split. The plot shows each test-time method against"
    ' its control (`none` for a method that trains nothing); "gains most" lists only buckets with a significant gain'
    " against the control."
)


def _table_section(
    run_dir: Path, key: tuple, by_label: dict[str, CellRecord], against: str, table: list[dict]
) -> tuple[list[str], dict]:
    """One table's part of the report (its lines, and its entry in REPORT.json): the setting, each
    method against `against` and against its control, the gain against position, the papers' claims."""
    from tta_bench.results.claims import setting

    lines = [f"## {key[0]} · {key[1]}", "", f"_{key[2]}; {key[3]}; device: {key[4]}_", ""]
    logs = {label: tokenlog.read(run_dir, rec) for label, rec in by_label.items()}
    settings = {label: setting(rec) for label, rec in by_label.items()}
    entry = {"table": list(key), "settings": settings, "comparisons": []}
    curves, gains = {}, {}
    recs_by_label = {label: [rec] for label, rec in by_label.items()}
    lines += _setting_lines(settings)
    for label in sorted(by_label):
        if label == against:
            continue
        control = control_label(by_label[label], recs_by_label) or against
        for ref in dict.fromkeys([against, control]):  # once where the control is `against`
            rec, other = by_label[label], by_label[ref]
            result = compare(logs[label], logs[ref])
            entry["comparisons"].append(
                {"method": label, "against": ref, "cells": [rec.cell_id, other.cell_id], "buckets": result}
            )
            lines += _comparison_lines(label, ref, rec.cell_id, other.cell_id, result)
        if (by_label[label].role or {}).get("test_time"):  # a static control's gain is the domain's, not TTA's
            curves[label] = (control, by_position(logs[label], logs[control]))
        gains[label] = gains_most(entry["comparisons"][-1]["buckets"])
    plot = run_dir / f"report-{slug(key)}.png"
    try:
        gain_curves(key, curves, plot)
        lines += [f"![gain against position vs the control, {key[0]}]({plot.name})", ""]
    except ImportError:
        pass
    lines += _claims(table, settings, {k: r.method_name for k, r in by_label.items()}, gains)
    return lines, entry


def gains_most(result: dict) -> str:
    """The buckets (besides `all`) with a significant gain, largest first; "none significant" else."""
    found = sorted(
        (b["mean"], name) for name, b in result.items() if name != "all" and b["significant"] and b["mean"] < 0
    )
    return "; ".join(f"{name} ({mean:+.3f})" for mean, name in found[:3]) or "none significant"


def _setting_lines(settings: dict[str, dict]) -> list[str]:
    """The table's setting: documents, useful adaptation steps per document, context, datastore, training."""
    out = [
        "### Setting",
        "",
        "Adaptation steps: the updates per document that a later scored segment uses (segments minus one under"
        " reset per document). Mean base context: the earlier tokens of its document the model sees per scored token.",
        "",
        "| method | documents | tokens | adaptation steps per document (min / mean) | mean base context | datastore keys | training |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, s in sorted(settings.items()):
        steps = f"{s['steps_min']} / {s['steps_mean']:.1f}" if s["adapts"] else "— (static)"
        train = "; ".join(
            f"{t['kind']}: {t['steps']} steps, best {t['best_step']}, stopped by {t['stopped_by']}"
            + (
                "; learned step sizes (mean at the best step): "
                + ", ".join(f"{k} {v:.3g}" for k, v in sorted(t["eta"].items()))
                if t["eta"]
                else ""
            )
            for t in s["training"]
        )
        keys = "—" if s["datastore_keys"] is None else f"{s['datastore_keys']:,}"
        out.append(
            f"| {label} | {s['documents']} | {s['tokens']} | {steps} | {s['mean_context']:.0f} | {keys} | {train or '—'} |"
        )
    return out + [""]


def _comparison_lines(label: str, ref: str, cell: str, ref_cell: str, result: dict) -> list[str]:
    """One comparison's table of buckets."""
    return [
        f"### {label} vs {ref}",
        "",
        f"_cells `{cell}` and `{ref_cell}`_",
        "",
        "| bucket | tokens | mean ΔNLL [95% CI] | Holm-adjusted p |",
        "|---|---|---|---|",
        *(
            f"| {name} | {b['tokens']} | {_fmt(b)} | {'—' if b['p_holm'] is None else format(b['p_holm'], '.3g')} |"
            for name, b in result.items()
        ),
        "",
    ]


def _training(records: list[CellRecord]) -> list[str]:
    """The validation curve of every trained state the cells used (each once, with the settings using it)."""
    states: dict[str, tuple[dict, set]] = {}
    for rec in records:
        for e in (rec.prepare or {}).get("cache", []):
            if (e.get("info") or {}).get("history"):
                states.setdefault(e["folder"], (e, set()))[1].add(rec.label)
    out = []
    for folder, (e, labels) in sorted(states.items(), key=lambda kv: sorted(kv[1][1])):
        info = e["info"]
        curve = ", ".join(f"{h['step']}: {h['val_nll']:.4f}" for h in info["history"])
        out.append(
            f"- **{e['kind']}** (`{Path(folder).name}`, used by {', '.join(sorted(labels))}): {info.get('steps')} steps,"
            f" best validation NLL {info['val_nll']:.4f} at step {info['best_step']}; validation NLL by step: {curve}"
        )
    return (
        (
            [
                "## Training curves",
                "",
                "Validation NLL (nats/token) on held-out prepare tokens during training;"
                " the best step's weights are kept.",
                "",
                *out,
                "",
            ]
        )
        if out
        else []
    )


def _claims(table: list[dict], settings: dict, names: dict[str, str], gains: dict[str, str]) -> list[str]:
    """The papers' claims (SPEC 9; each method's `claim` and `claim_setting`) next to this setting and
    what this table measured (claims.py)."""
    from tta_bench.results.claims import claim_rows

    out = claim_rows(table, settings, names, gains)
    return (["### Against the papers' claims", ""] + out + [""]) if out else []
