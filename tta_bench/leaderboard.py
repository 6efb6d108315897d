"""Leaderboards from cell records: one table per (task, model), as Markdown and CSV."""
from __future__ import annotations

import math
from pathlib import Path

from .errors import TTABenchError
from .results import atomic_write, load_cells

COLUMNS = ["method", "token ppl", "95% CI", "Δ ppl vs none", "word ppl", "bits/byte", "GFLOPs/token",
           "FLOPs × none", "tokens/s", "time × none", "peak mem (MB)", "prepare (s)", "seeds"]


def _group_key(rec: dict) -> tuple:
    cfg, res = rec["config"], rec["resolved"]
    task = f"{cfg['task']['name']}:{cfg['task']['split']}"
    proto = f"seg {res['segment_len']}, ctx {res['context_len']}, reset {res['reset']}"
    return task, cfg["model"]["name"], proto, rec["stream"]["fingerprint"], rec["costs"]["device"]


def rows(records: list[dict]) -> dict[tuple, list[dict]]:
    """Table rows per (task, model, protocol, stream, device); seeds of one method are averaged."""
    import numpy as np

    groups: dict[tuple, dict[str, list[dict]]] = {}
    for rec in records:
        groups.setdefault(_group_key(rec), {}).setdefault(rec["label"], []).append(rec)
    tables = {}
    for key, by_label in groups.items():
        def mean(recs, get):
            vals = [get(r) for r in recs]
            vals = [v for v in vals if v is not None]
            return float(np.mean(vals)) if vals else None

        base = by_label.get("none")
        base_flops = mean(base, lambda r: r["costs"]["gflops_per_token"]) if base else None
        base_time = mean(base, lambda r: r["costs"]["eval_seconds"] / r["stream"]["n_tokens"]) if base else None
        base_ppl = mean(base, lambda r: r["metrics"]["token_ppl"]) if base else None
        out = []
        for label, recs in by_label.items():
            ppl = mean(recs, lambda r: r["metrics"]["token_ppl"])
            flops = mean(recs, lambda r: r["costs"]["gflops_per_token"])
            sec_per_tok = mean(recs, lambda r: r["costs"]["eval_seconds"] / r["stream"]["n_tokens"])
            out.append({
                "method": label,
                "token_ppl": ppl,
                "token_ppl_std": float(np.std([r["metrics"]["token_ppl"] for r in recs], ddof=1)) if len(recs) > 1 else None,
                "ci95_low": mean(recs, lambda r: r["metrics"]["ci95"]["token_ppl"][0]),
                "ci95_high": mean(recs, lambda r: r["metrics"]["ci95"]["token_ppl"][1]),
                "delta_ppl_vs_none": ppl - base_ppl if base_ppl is not None else None,
                "word_ppl": mean(recs, lambda r: r["metrics"]["word_ppl"]),
                "bits_per_byte": mean(recs, lambda r: r["metrics"]["bits_per_byte"]),
                "gflops_per_token": flops,
                "flops_x_none": flops / base_flops if base_flops else None,
                "tokens_per_s": mean(recs, lambda r: r["costs"]["tokens_per_second"]),
                "time_x_none": sec_per_tok / base_time if base_time else None,
                "peak_mem_mb": mean(recs, lambda r: r["costs"]["peak_memory_bytes"] / 2**20),
                "prepare_s": mean(recs, lambda r: r["costs"]["prepare_seconds"]),
                "seeds": len(recs),
            })
        out.sort(key=lambda r: r["token_ppl"])
        tables[key] = out
    return tables


def _fmt(v, spec: str, na: str = "n/a") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return na
    return format(v, spec)


def markdown(tables: dict[tuple, list[dict]]) -> str:
    from tabulate import tabulate

    parts = ["# tta-bench leaderboard", "",
             "Lower is better for perplexity (↓) and bits/byte (↓); ratios are to `none` on the identical stream and device.", ""]
    for (task, model, proto, fingerprint, device), table in sorted(tables.items()):
        parts.append(f"## {task} · {model}")
        parts.append(f"_{proto}; stream {fingerprint}; device: {device}_")
        parts.append("")
        body = []
        for r in table:
            ppl = _fmt(r["token_ppl"], ".2f") + (f" ± {r['token_ppl_std']:.2f}" if r["token_ppl_std"] else "")
            delta = r["delta_ppl_vs_none"]
            arrow = "" if delta is None or abs(delta) < 1e-9 else ("↓ " if delta < 0 else "↑ ")
            body.append([r["method"], ppl, f"[{_fmt(r['ci95_low'], '.2f')}, {_fmt(r['ci95_high'], '.2f')}]",
                         arrow + _fmt(delta, "+.2f"), _fmt(r["word_ppl"], ".2f"), _fmt(r["bits_per_byte"], ".4f"),
                         _fmt(r["gflops_per_token"], ".3f"), _fmt(r["flops_x_none"], ".2f"), _fmt(r["tokens_per_s"], ".0f"),
                         _fmt(r["time_x_none"], ".2f"), _fmt(r["peak_mem_mb"], ".0f"), _fmt(r["prepare_s"], ".1f"), r["seeds"]])
        parts.append(tabulate(body, headers=[c + (" ↓" if c in ("token ppl", "bits/byte") else "") for c in COLUMNS],
                              tablefmt="github", disable_numparse=True))
        parts.append("")
    return "\n".join(parts)


def write_leaderboard(run_dir: Path) -> list[Path]:
    import pandas as pd

    records = load_cells(run_dir)
    if not records:
        raise TTABenchError(f"no cell records under {run_dir}/cells; run a bench first")
    tables = rows(records)
    md = run_dir / "leaderboard.md"
    atomic_write(md, markdown(tables))
    flat = []
    for (task, model, proto, fingerprint, device), table in sorted(tables.items()):
        for r in table:
            flat.append({"task": task, "model": model, "protocol": proto, "stream": fingerprint, "device": device, **r})
    csv = run_dir / "leaderboard.csv"
    atomic_write(csv, pd.DataFrame(flat).to_csv(index=False))
    return [md, csv]
