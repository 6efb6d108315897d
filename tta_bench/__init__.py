"""tta-bench: test-time adaptation of language models, measured side by side.

The public API, by the package that owns each name (imported on first use, so that `import
tta_bench` and the command line stay fast):

- api/: Method, Segment, Task, Document, register_method, register_task, register_model, TTABenchError
- protocol/: Protocol, evaluate, Stream, tokenize, load_model, LM, Ledger, summarize
- prepare/: PrepareData
- run/: run_bench, prepare_bench (`run` and `prepare` of the command line), RunOptions, load, validate,
  expand, Cell, build_cell, StreamCache
- results/: CellRecord, load_cells, read_cell, compare_published, write_leaderboard, write_report, kernel_info
- checks/: run_checks
"""

from __future__ import annotations

import importlib

from tta_bench.api.errors import RunFailed, TTABenchError
from tta_bench.api.registry import register_method, register_model, register_task

__version__ = "0.1.0"

_LAZY = {
    "Method": "api.method",
    "Segment": "api.method",
    "method_class": "api.method",
    "Task": "api.task",
    "Document": "api.task",
    "Protocol": "protocol.evaluate",
    "evaluate": "protocol.evaluate",
    "EvalResult": "protocol.evaluate",
    "Stream": "protocol.stream",
    "tokenize": "protocol.stream",
    "load_model": "protocol.models",
    "LM": "protocol.lm",
    "Ledger": "protocol.flops",
    "summarize": "protocol.metrics",
    "PrepareData": "prepare.prepared",
    "run_bench": "run.runner:run",
    "prepare_bench": "run.runner:prepare",
    "load": "run.config",
    "validate": "run.config",
    "expand": "run.config",
    "Cell": "run.config",
    "build_cell": "run.cells",
    "StreamCache": "run.cells",
    "RunOptions": "run.options",
    "CellRecord": "results.records",
    "load_cells": "results.records",
    "read_cell": "results.records",
    "compare_published": "results.records",
    "write_leaderboard": "results.leaderboard",
    "write_report": "results.report",
    "kernel_info": "results.kernels",
    "run_checks": "checks.validity",
    "cache_dir": "_paths",
}
__all__ = ["RunFailed", "TTABenchError", "register_method", "register_model", "register_task", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module, _, attr = _LAZY[name].partition(":")
        value = getattr(importlib.import_module(f"tta_bench.{module}"), attr or name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tta_bench' has no attribute {name!r}")
