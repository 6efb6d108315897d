"""Where the checkout and the cache are (infrastructure every package may use)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the checkout: tta_bench/ and methods/ beside each other


def cache_dir() -> Path:
    """Where loaded models and prepared state are cached: $TTA_BENCH_CACHE, else ~/.cache/tta_bench."""
    return Path(os.environ.get("TTA_BENCH_CACHE", Path.home() / ".cache" / "tta_bench"))
