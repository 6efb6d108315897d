"""Cell records (SPEC 7): one JSON file per cell, named by the hash of its resolved config; reading
them back, and whether a run reproduces the published ones."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

SCHEMA = "tta-bench/cell/v2"  # v2: status (ok | failed) and resume_key


@dataclass
class CellRecord:
    """One cell's record (SPEC 7), as `run` writes it to cells/<cell id>.json (`to_json`) and reads it
    back (`from_json`). A finished cell (status ok) holds its results; a failed one its reason and the
    name of the log holding its traceback. Each section (config, metrics, costs, ...) stays the JSON
    mapping it is on disk: published records of older layouts hold fewer keys (no device class, no
    prepare FLOPs) and load as they are."""

    cell_id: str
    label: str
    config: dict  # the cell's resolved config (Cell.as_dict): its id is the hash of it
    status: str = "ok"
    resolved: dict | None = None  # what the run resolved: protocol, prepare split, model, method params
    stream: dict | None = None  # the evaluated stream: task, split, fingerprint, documents, tokens
    metrics: dict | None = None  # nll_sum, token_ppl, bits_per_byte, ... with their bootstrap CIs
    per_doc: list | None = None  # per document: title, nll, tokens, bytes, words
    costs: dict | None = None  # flops, time, peak memory, prepare (SPEC 5)
    role: dict | None = None  # whether it adapts at test time, and its control (SPEC 3)
    prepare: dict | None = None  # prepare's seconds and what it found in the cache
    checks: dict | None = None  # `run --check`: the validity checks of its setting
    provenance: dict = field(default_factory=dict)
    selection: dict | None = None  # a `select_on` cell: the split that chose, the candidates, the choice
    reason: str | None = None  # a failed cell: the exception's first line
    log: str | None = None  # a failed cell: the file (beside the record) holding its traceback
    resume_key: dict | None = None  # what its result depends on besides its config (resume.py)
    token_log: dict | None = None  # `log_tokens`: the per-token log's file, sha256 and tokens
    schema: str = SCHEMA
    # carried from the cell's run to write_record, which stores them beside the record, never in it
    traceback: str | None = field(default=None, repr=False)
    token_arrays: dict | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def method_name(self) -> str:
        return self.config["method"]["name"]

    @property
    def seed(self) -> int:
        return self.config["seed"]

    @property
    def device(self) -> str:
        """The device line (a cell that failed early has only its provenance's)."""
        return self.costs["device"] if self.costs is not None else self.provenance.get("device", "?")

    @property
    def doc_nll(self) -> list[float]:
        return [d["nll"] for d in self.per_doc]

    @property
    def doc_tokens(self) -> list[int]:
        return [d["tokens"] for d in self.per_doc]

    def to_json(self) -> dict:
        """The cell file's mapping, its keys in the order records have always had them."""
        head = {"schema": self.schema, "cell_id": self.cell_id, "label": self.label, "config": self.config}
        if self.status == "failed":
            body = {"status": self.status, "reason": self.reason, "log": self.log, "provenance": self.provenance}
        else:
            body = {
                "resolved": self.resolved,
                "stream": self.stream,
                "metrics": self.metrics,
                "per_doc": self.per_doc,
                "costs": self.costs,
                "role": self.role,
                "prepare": self.prepare,
                "checks": self.checks,
                "provenance": self.provenance,
                **({} if self.selection is None else {"selection": self.selection}),
                "status": self.status,
            }
        tail = {k: v for k, v in (("resume_key", self.resume_key), ("token_log", self.token_log)) if v is not None}
        return {**head, **body, **tail}

    @classmethod
    def from_json(cls, data: dict) -> CellRecord:
        """A record from its file's mapping (read_cell checks its shape first)."""
        stored = {f.name for f in fields(cls)} - {"traceback", "token_arrays"}
        return cls(**{k: v for k, v in data.items() if k in stored})


def cell_path(run_dir: Path, cell_id: str) -> Path:
    return run_dir / "cells" / f"{cell_id}.json"


def read_cell(path: Path) -> tuple[CellRecord | None, str | None]:
    """(record, None), or (None, why it cannot be used): unreadable, truncated, or of another shape."""
    try:
        rec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable ({type(e).__name__}: {str(e)[:80]})"
    if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
        return None, f"not a {SCHEMA} record"
    status = rec.get("status")
    mappings = ("config", "resume_key") + (("metrics", "costs", "resolved", "stream") if status == "ok" else ())
    missing = [k for k in ("cell_id", "label") if not isinstance(rec.get(k), str)] + [
        k for k in mappings if not isinstance(rec.get(k), dict)
    ]
    if status not in ("ok", "failed") or missing:
        return None, f"malformed (status {status!r}; missing {', '.join(missing) or 'nothing'})"
    return CellRecord.from_json(rec), None


def load_cells(run_dir: Path, notes: list | None = None) -> list[CellRecord]:
    """Every usable cell record of a run folder; each file that cannot be used adds a note instead."""
    cells = []
    for f in sorted((Path(run_dir) / "cells").glob("*.json")):
        rec, why = read_cell(f)
        if rec is None:
            if notes is not None:
                notes.append(f"skipped {f}: {why}; `run` recomputes it")
            continue
        cells.append(rec)
    return cells


def compare_published(run_dir: Path, published: Path, cell_ids: set) -> list[str]:
    """Lines saying whether this run's cells reproduce the published ones (same cell id: the same
    resolved config) under the reproduction policy (SPEC 7, kernels.py): within 1e-9 relative on the
    same device class, within the measured cross-class tolerance otherwise. One line per case, with
    the largest difference, then every cell beyond its case's tolerance."""
    from tta_bench.results.kernels import reproduction_tolerance

    run_dir, published = Path(run_dir), Path(published)
    if run_dir.resolve() == published.resolve():
        return []
    mine = {r.cell_id: r for r in load_cells(run_dir) if r.cell_id in cell_ids and r.ok}
    theirs = {r.cell_id: r for r in load_cells(published)} if (published / "cells").is_dir() else {}
    both = sorted(set(mine) & set(theirs), key=lambda c: mine[c].label)
    if not both:
        return [f"reproduction: none of this run's cells is published in {published}"]
    cases: dict[tuple, list] = {}
    for c in both:
        a, b = mine[c].metrics["nll_sum"], theirs[c].metrics["nll_sum"]
        tol, case = reproduction_tolerance(theirs[c].provenance.get("kernels"), mine[c].provenance["kernels"])
        cases.setdefault((case, tol), []).append((mine[c], a, b, abs(a - b) / max(abs(b), 1e-300)))
    lines = [line for (case, tol), found in cases.items() for line in _case_lines(found, case, tol, published)]
    if len(both) < len(mine):
        lines.append(f"  {len(mine) - len(both)} of this run's {len(mine)} cells are not published in {published}")
    return lines


def _case_lines(found: list[tuple], case: str, tol: float, published: Path) -> list[str]:
    """One case's line, with the largest difference, then each cell beyond the tolerance."""
    off = [f for f in found if not f[3] <= tol]
    largest = max(f[3] for f in found)
    if not off:
        return [
            f"reproduction: {len(found)} of {len(found)} within {largest:.1e} of the published in {published},"
            f" {case}; tolerance {tol:g}"
        ]
    return [
        f"reproduction: {len(off)} of {len(found)} differ from the published in {published} by more than"
        f" the tolerance {tol:g}, {case}; largest {largest:.1e}:"
    ] + [
        f"  {rec.label} on {rec.config['task'].get('label') or rec.stream['task']}:"
        f" nll_sum {a:.6f}, published {b:.6f} ({rel:.2e} relative)"
        for rec, a, b, rel in off
    ]
