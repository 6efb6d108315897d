"""`tta-bench report RESULTS_DIR`: where each method gains, from the per-token logs (tokenlog.py).

Every method is set against a baseline (`none` unless told otherwise) and against its control (SPEC 3)
on the same tokens: the difference in NLL per token (negative: the method is better), by bucket:
- frequency: the target's rank by frequency in the prepare split (the 1k most frequent, 1k-10k, rarer, unseen);
- occurrence: the target's first occurrence in its document, or a repeat;
- position in the document: under 128, 128-512, 512-2k, 2k and beyond.
Each bucket gets its mean difference with a paired bootstrap CI over documents (the same resampled
documents for both cells) and its share of the method's total gain. REPORT.md (with REPORT.json
holding the same numbers and the cell files they come from) and a plot of the gain against position
per table are written into the results folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tta_bench.results import tokenlog
from tta_bench.api.errors import TTABenchError
from tta_bench.results.leaderboard import control_label, load_records, rows, table_key
from tta_bench.results.records import CellRecord
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


def compare(log: dict, ref: dict, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per bucket: tokens, mean NLL difference (log vs ref, nats per token), its paired bootstrap CI
    over documents, and its share of the total difference."""
    if not (np.array_equal(log["targets"], ref["targets"]) and np.array_equal(log["doc_offsets"], ref["doc_offsets"])):
        raise TTABenchError("two per-token logs of one table score different tokens; rerun both cells")
    diff = nll_difference(log, ref)
    offsets = log["doc_offsets"]
    doc = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    n_docs, total = len(offsets) - 1, diff.sum()
    draws = np.random.default_rng(seed).integers(0, n_docs, size=(n_boot, n_docs))
    out = {}
    for name, mask in {"all": np.ones(len(diff), bool), **buckets(log)}.items():
        sums = np.bincount(doc[mask], diff[mask], minlength=n_docs)
        counts = np.bincount(doc[mask], minlength=n_docs).astype(np.float64)
        n = int(mask.sum())
        entry = {
            "tokens": n,
            "mean": float(sums.sum() / n) if n else None,
            "ci95": None,
            "share": float(sums.sum() / total) if total else None,
        }
        if n:
            with np.errstate(invalid="ignore", divide="ignore"):
                boot = sums[draws].sum(1) / counts[draws].sum(1)
            boot = boot[np.isfinite(boot)]  # resamples without a token of the bucket say nothing
            if len(boot):
                lo, hi = np.percentile(boot, [2.5, 97.5])
                entry["ci95"] = [min(float(lo), entry["mean"]), max(float(hi), entry["mean"])]
        out[name] = entry
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
    ci = entry["ci95"]
    star = "*" if ci and (ci[0] > 0 or ci[1] < 0) else ""
    return f"{entry['mean']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]{star}" if ci else f"{entry['mean']:+.4f}"


def _plot(key, curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, points in sorted(curves.items()):
        ax.plot([p[0] + 1 for p in points], [p[1] for p in points], "-o", markersize=3, label=label)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the document (bin start + 1, tokens)")
    ax.set_ylabel("mean NLL difference vs none (nats/token; < 0: better)")
    ax.set_title(f"{key[0]} · {key[1]}\n{key[2]}; {key[3]}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    try:
        atomic_write(path, write=fig.savefig)
    finally:
        plt.close(fig)


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
    lines = [
        "# Where each method gains",
        "",
        f"Generated by `python -m tta_bench report {run_dir}` from the per-token logs of the cells in `{run_dir}/cells/`."
        " Each entry is the mean difference in NLL per token (nats; negative: the method is better) on the tokens of"
        " a bucket, with a paired bootstrap 95% CI over documents (* where it excludes 0), and the bucket's share of"
        " the method's total difference. Frequency ranks come from the prepare split.",
        "",
    ]
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


def _table_section(
    run_dir: Path, key: tuple, by_label: dict[str, CellRecord], against: str, table: list[dict]
) -> tuple[list[str], dict]:
    """One table's part of the report (its lines, and its entry in REPORT.json): each method against
    `against` and against its control, the plot of the gain against position, the papers' claims."""
    lines = [f"## {key[0]} · {key[1]}", "", f"_{key[2]}; {key[3]}; device: {key[4]}_", ""]
    logs = {label: tokenlog.read(run_dir, rec) for label, rec in by_label.items()}
    entry, curves = {"table": list(key), "comparisons": []}, {}
    recs_by_label = {label: [rec] for label, rec in by_label.items()}
    for label in sorted(by_label):
        if label == against:
            continue
        curves[label] = by_position(logs[label], logs[against])
        versus = [against] + [c for c in [control_label(by_label[label], recs_by_label)] if c and c != against]
        for ref in versus:
            rec, other = by_label[label], by_label[ref]
            result = compare(logs[label], logs[ref], seed=rec.seed)
            entry["comparisons"].append(
                {"method": label, "against": ref, "cells": [rec.cell_id, other.cell_id], "buckets": result}
            )
            lines += _comparison_lines(label, ref, rec.cell_id, other.cell_id, result)
    plot = run_dir / f"report-{slug(key)}.png"
    try:
        _plot(key, curves, plot)
        lines += [f"![gain against position, {key[0]}]({plot.name})", ""]
    except ImportError:
        pass
    lines += _claims(table, entry["comparisons"], against, {k: r.method_name for k, r in by_label.items()})
    return lines, entry


def _comparison_lines(label: str, ref: str, cell: str, ref_cell: str, result: dict) -> list[str]:
    """One comparison's table of buckets."""
    return [
        f"### {label} vs {ref}",
        "",
        f"_cells `{cell}` and `{ref_cell}`_",
        "",
        "| bucket | tokens | mean ΔNLL [95% CI] | share of total Δ |",
        "|---|---|---|---|",
        *(
            f"| {name} | {b['tokens']} | {_fmt(b)} | {'—' if b['share'] is None else format(100 * b['share'], '.0f') + '%'} |"
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


def _claims(table: list[dict], comparisons: list[dict], against: str, names: dict[str, str]) -> list[str]:
    """The papers' claims (SPEC 9; each method's `claim`) next to what this table measured."""
    from tta_bench.api.method import method_class

    def where(method):
        comp = next((c for c in comparisons if c["method"] == method and c["against"] == against), None)
        if comp is None:
            return "—"
        out = []
        for kind in ("frequency", "occurrence", "position"):
            names = [n for n in comp["buckets"] if n.startswith(kind) and comp["buckets"][n]["mean"] is not None]
            best = min(names, key=lambda n: comp["buckets"][n]["mean"], default=None)
            if best:
                out.append(f"{best} ({comp['buckets'][best]['mean']:+.3f})")
        return "; ".join(out)

    def num(v, spec):
        return "n/a" if v is None else format(v, spec)

    out = [
        "| method | paper's claim | time × none | FLOPs × none | Δ ppl vs none | Δ ppl vs control | gains most (mean ΔNLL) |",
        "|---|---|---|---|---|---|---|",
    ]

    def claim_of(label):
        try:
            return method_class(names[label]).claim
        except (KeyError, TTABenchError):  # a failed row, or a method no longer registered
            return ""

    for r in table:
        claim = claim_of(r["method"]) if r.get("status") != "failed" else ""
        if not claim:
            continue
        out.append(
            f"| {r['method']} | {claim} | {num(r['time_x_none'], '.2f')} | {num(r['flops_x_none'], '.2f')} |"
            f" {num((r['vs_none'] or {}).get('delta_ppl'), '+.2f')} | {num((r['vs_control'] or {}).get('delta_ppl'), '+.2f')} |"
            f" {where(r['method'])} |"
        )
    return (["### Against the papers' claims", ""] + out + [""]) if len(out) > 2 else []
