"""Files that are never half-written: atomic writes with the umask's permissions, one run per results
folder (a lock), and whether a folder can be written at all."""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
from pathlib import Path

from tta_bench._paths import cache_dir
from tta_bench.api.errors import TTABenchError


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
            raise TTABenchError(
                f"another tta-bench run ({who}) is writing {self.run_dir}; wait for it to finish, or"
                " set a different `run:`"
            ) from None
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
