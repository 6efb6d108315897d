"""Command line: run, validate, list, leaderboard."""
from __future__ import annotations

import argparse
import sys

from .errors import TTABenchError


def _cmd_run(args) -> int:
    from .runner import run

    run(args.bench, force=args.force, progress=False if args.no_progress else None)
    return 0


def _cmd_validate(args) -> int:
    from .config import read_yaml, validate

    cfg, problems = validate(read_yaml(args.bench), args.bench)
    if problems:
        print(f"{args.bench}: {len(problems)} problem{'s' if len(problems) > 1 else ''}", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    from .config import expand

    n = len(expand(cfg, cfg.device))
    print(f"{args.bench}: ok ({n} cell{'s' if n != 1 else ''}: {len(cfg.models)} model(s) x {len(cfg.tasks)} task(s) x"
          f" {len(cfg.methods)} method setting(s) x {len(cfg.seeds)} seed(s))")
    return 0


def _cmd_list(args) -> int:
    from .registry import describe, discover

    discover(args.plugins or [])
    for kind in ("method", "task", "model"):
        if args.kind and args.kind.rstrip("s") != kind:
            continue
        print(f"{kind}s:")
        entries = describe(kind)
        width = max((len(n) for n, _ in entries), default=0)
        for name, desc in entries:
            print(f"  {name:<{width}}  {desc}")
    if not args.kind or args.kind.startswith("model"):
        print("  (also: any Hugging Face hub id org/name or hf:name, a local model folder, a .gguf file)")
    return 0


def _cmd_leaderboard(args) -> int:
    from pathlib import Path

    from .leaderboard import write_leaderboard

    for out in write_leaderboard(Path(args.results)):
        print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tta-bench", description="Benchmark test-time adaptation of language models.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run every unfinished cell of a bench file, then write the leaderboard")
    r.add_argument("bench")
    r.add_argument("--force", action="store_true", help="recompute cells that already have results")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(fn=_cmd_run)
    v = sub.add_parser("validate", help="check a bench file and report every problem")
    v.add_argument("bench")
    v.set_defaults(fn=_cmd_validate)
    ls = sub.add_parser("list", help="methods, tasks and models with a one-line description")
    ls.add_argument("kind", nargs="?", choices=["methods", "tasks", "models"])
    ls.add_argument("--plugins", nargs="*", help="extra plugin folders or files")
    ls.set_defaults(fn=_cmd_list)
    lb = sub.add_parser("leaderboard", help="write Markdown and CSV leaderboards for a results folder")
    lb.add_argument("results")
    lb.set_defaults(fn=_cmd_leaderboard)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except TTABenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished cells are saved; rerun the same command to resume", file=sys.stderr)
        return 130
