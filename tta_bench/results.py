"""Cell records (SPEC 7): one JSON file per cell, named by the hash of its resolved config, written
atomically, with provenance."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from .errors import TTABenchError

SCHEMA = "tta-bench/cell/v1"
_REPO = Path(__file__).resolve().parent.parent


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def load_cells(run_dir: Path) -> list[dict]:
    cells = []
    for f in sorted((Path(run_dir) / "cells").glob("*.json")):
        try:
            rec = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise TTABenchError(f"cell file {f} is unreadable ({e}); delete it and rerun to recompute it") from None
        if rec.get("schema") == SCHEMA:
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


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name}, {torch.get_num_threads()} threads"


def provenance(device, seed: int, requires: tuple = ()) -> dict:
    """Where a cell's numbers come from; `requires`: the method's own packages (Method.requires)."""
    versions = {}
    for pkg in ("tta-bench", "torch", "transformers", "fvcore", "numpy", "gguf", *requires):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {
        "git": _git(),
        "versions": versions,
        "python": platform.python_version(),
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "host": platform.node(),
    }
