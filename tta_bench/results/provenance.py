"""Provenance (SPEC 7): where a cell's numbers come from: the commit and whether it was dirty, package
versions, the device and what picks its kernels (kernels.py), date, seed, host."""

from __future__ import annotations

import datetime
import platform
import subprocess
from importlib import metadata

from tta_bench._paths import REPO


def _git() -> dict:
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)

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
    from tta_bench.results.kernels import device_line, kernel_info

    return device_line(kernel_info(device, requires))


def provenance(device, seed: int, requires: tuple = ()) -> dict:
    """Where a cell's numbers come from; `requires`: the method's own packages (Method.requires).
    `kernels` is what decides the kernels (kernels.py): the reproduction check reads it."""
    from tta_bench.results.kernels import device_line, kernel_info

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
