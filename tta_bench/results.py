"""Cell records (SPEC 7): one JSON file per cell, named by the hash of its resolved config, written
atomically, with provenance."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from .errors import TTABenchError

SCHEMA = "tta-bench/cell/v2"  # v2: status (ok | failed) and resume_key
_REPO = Path(__file__).resolve().parent.parent


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: str | bytes | None = None, write=None) -> None:
    """Write `data` (or call `write(tmp_path)`) into a temporary file beside `path`, then rename it
    over `path`: readers see the old file or the new one, never half of one. The file gets the
    permissions of a plain open() (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        if write is None:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        else:
            os.close(fd)
            write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class RunLock:
    """One run at a time per results folder: a second one stops at once with a message naming the
    first. The lock file lives in the cache, not in the results folder."""

    def __init__(self, run_dir: Path):
        from .data import cache_dir

        key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        self.run_dir, self.path = run_dir, cache_dir() / "locks" / f"{key}.lock"

    def __enter__(self):
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(self.path))
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            holder = self.path.with_suffix(".pid")
            who = holder.read_text().strip() if holder.exists() else "another process"
            raise TTABenchError(f"another tta-bench run ({who}) is writing {self.run_dir}; wait for it to finish, or"
                                " set a different `run:`") from None
        self.path.with_suffix(".pid").write_text(f"pid {os.getpid()} on {platform.node()}")
        return self

    def __exit__(self, *exc):
        self.lock.release()


def writable_problem(folder: Path) -> str | None:
    """Whether `folder` can be created and written. Probes the nearest existing ancestor with a
    temporary file that is removed at once (permission bits alone mislead when running as root)."""
    p = Path(folder).resolve()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"output directory {folder} cannot be created: {p} is a file; choose another output_dir"
    try:
        fd, probe = tempfile.mkstemp(dir=p, prefix=".tta_bench_probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"output directory {folder} cannot be written ({p}: {e.strerror}); choose another output_dir"
    return None


def cell_path(run_dir: Path, cell_id: str) -> Path:
    return run_dir / "cells" / f"{cell_id}.json"


def read_cell(path: Path) -> tuple[dict | None, str | None]:
    """(record, None), or (None, why it cannot be used): unreadable, truncated, or of another shape."""
    try:
        rec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable ({type(e).__name__}: {str(e)[:80]})"
    if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
        return None, f"not a {SCHEMA} record"
    status = rec.get("status")
    mappings = ("config", "resume_key") + (("metrics", "costs", "resolved", "stream") if status == "ok" else ())
    missing = ([k for k in ("cell_id", "label") if not isinstance(rec.get(k), str)]
               + [k for k in mappings if not isinstance(rec.get(k), dict)])
    if status not in ("ok", "failed") or missing:
        return None, f"malformed (status {status!r}; missing {', '.join(missing) or 'nothing'})"
    return rec, None


def load_cells(run_dir: Path, notes: list | None = None) -> list[dict]:
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


def _git() -> dict:
    def git(*args):
        return subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}


def device_name(device, requires: tuple = ()) -> str:
    """The device with its class, as a leaderboard's device line shows it: `CPU: AMD EPYC (AVX2), 2 threads`."""
    from .kernels import device_line, kernel_info

    return device_line(kernel_info(device, requires))


def provenance(device, seed: int, requires: tuple = ()) -> dict:
    """Where a cell's numbers come from; `requires`: the method's own packages (Method.requires).
    `kernels` is what decides the kernels (kernels.py): the reproduction check reads it."""
    from .kernels import device_line, kernel_info

    versions = {}
    for pkg in ("tta-bench", "torch", "transformers", "fvcore", "numpy", "gguf", *requires):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    kernels = kernel_info(device, requires)
    return {
        "git": _git(),
        "versions": versions,
        "python": platform.python_version(),
        "device": device_line(kernels),
        "kernels": kernels,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "host": platform.node(),
    }


def compare_published(run_dir: Path, published: Path, cell_ids: set) -> list[str]:
    """Lines saying whether this run's cells reproduce the published ones (same cell id: the same
    resolved config) under the reproduction policy (SPEC 7, kernels.py): within 1e-9 relative on the
    same device class, within the measured cross-class tolerance otherwise. One line per case, with
    the largest difference, then every cell beyond its case's tolerance."""
    from .kernels import reproduction_tolerance

    run_dir, published = Path(run_dir), Path(published)
    if run_dir.resolve() == published.resolve():
        return []
    mine = {r["cell_id"]: r for r in load_cells(run_dir) if r["cell_id"] in cell_ids and r["status"] == "ok"}
    theirs = {r["cell_id"]: r for r in load_cells(published)} if (published / "cells").is_dir() else {}
    both = sorted(set(mine) & set(theirs), key=lambda c: mine[c]["label"])
    if not both:
        return [f"reproduction: none of this run's cells is published in {published}"]
    cases: dict[tuple, list] = {}
    for c in both:
        a, b = mine[c]["metrics"]["nll_sum"], theirs[c]["metrics"]["nll_sum"]
        tol, case = reproduction_tolerance(theirs[c].get("provenance", {}).get("kernels"), mine[c]["provenance"]["kernels"])
        cases.setdefault((case, tol), []).append((c, a, b, abs(a - b) / max(abs(b), 1e-300)))
    lines = []
    for (case, tol), found in cases.items():
        off = [f for f in found if not f[3] <= tol]
        largest = max(f[3] for f in found)
        if not off:
            lines.append(f"reproduction: {len(found)} of {len(found)} within {largest:.1e} of the published in {published},"
                         f" {case}; tolerance {tol:g}")
            continue
        lines.append(f"reproduction: {len(off)} of {len(found)} differ from the published in {published} by more than"
                     f" the tolerance {tol:g}, {case}; largest {largest:.1e}:")
        lines += [f"  {mine[c]['label']} on {mine[c]['config']['task'].get('label') or mine[c]['stream']['task']}:"
                  f" nll_sum {a:.6f}, published {b:.6f} ({rel:.2e} relative)" for c, a, b, rel in off]
    if len(both) < len(mine):
        lines.append(f"  {len(mine) - len(both)} of this run's {len(mine)} cells are not published in {published}")
    return lines
