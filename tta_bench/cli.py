"""Command line: run, prepare, validate, list, leaderboard, report, check, export."""

from __future__ import annotations

import argparse
import sys

from tta_bench.api.errors import RunFailed, TTABenchError


def _sets(args) -> list[str]:
    """The lm-eval style flags as the `--set`s they stand for, then the `--set`s (a later one wins)."""
    from tta_bench.run.overrides import flag_sets

    flags = flag_sets(
        models=args.model or (),
        model_args=args.model_args,
        tasks=args.task or (),
        methods=args.method or (),
        limit=args.limit,
        limit_tokens=args.limit_tokens,
        device=args.device,
        output=args.output,
    )
    return flags + list(args.set or ())


def _cmd_run(args) -> int:
    from tta_bench.run.runner import run

    run(
        args.bench,
        sets=tuple(_sets(args)),
        force=args.force,
        progress=False if args.no_progress else None,
        check=True if args.check else None,
        log_tokens=args.log_tokens or None,
    )
    return 0


def _cmd_report(args) -> int:
    from tta_bench.results.report import write_report

    print(f"wrote {write_report(args.results, against=args.against)}")
    return 0


def _cmd_check(args) -> int:
    from tta_bench.checks.validity import run_checks

    ok = run_checks(
        args.bench,
        model=args.model,
        device=args.device,
        only_bench=args.only_bench,
        full_params=args.full_params,
        json_path=args.json,
    )
    return 0 if ok else 1


def _cmd_validate(args) -> int:
    from tta_bench.api.registry import IMPORTED
    from tta_bench.run.overrides import FLAGS_ONLY, resolve

    before = len(IMPORTED)
    cfg, problems = resolve(args.bench, _sets(args))
    name = args.bench or FLAGS_ONLY
    if IMPORTED[before:]:  # validating a plugin's parameters runs its code: say so
        print(f"imported plugin code: {', '.join(dict.fromkeys(IMPORTED[before:]))}", file=sys.stderr)
    if problems:
        print(f"{name}: {len(problems)} problem{'s' if len(problems) > 1 else ''}", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    from tta_bench.run.config import expand

    n = len(expand(cfg, cfg.device))
    print(
        f"{name}: ok ({n} cell{'s' if n != 1 else ''}: {len(cfg.models)} model(s) x {len(cfg.tasks)} task(s) x"
        f" {len(cfg.methods)} method setting(s) x {len(cfg.seeds)} seed(s)"
        + (", and the seeds some methods list" if any("seeds" in m for m in cfg.methods) else "")
        + ")"
    )
    return 0


def _cmd_list(args) -> int:
    from tta_bench.protocol import models  # noqa: F401  (registers the built-in models)
    from tta_bench.api.registry import describe, discover

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

    from tta_bench.results.leaderboard import write_leaderboard

    for out in write_leaderboard(
        [Path(r) for r in args.results], out=args.out, allow_mixed=args.allow_mixed, readme=args.readme
    ):
        print(f"wrote {out}")
    return 0


def _cmd_prepare(args) -> int:
    from tta_bench.run.runner import prepare

    prepare(args.bench, progress=False if args.no_progress else None, sets=tuple(_sets(args)))
    return 0


def _cmd_export(args) -> int:
    from tta_bench.results.export import export_lm_eval

    for out in export_lm_eval(args.results, out=args.out):
        print(f"wrote {out}")
    return 0


def _add_bench_arguments(p) -> None:
    """A bench file, changed from the command line, or a bench from the flags alone (lm-eval's habits)."""
    p.add_argument("bench", nargs="?", help="a bench YAML file (optional when --model, --task and --method are given)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="change one setting of the bench, read as YAML: protocol.segment_len=256, methods.3.lr=1e-3, models.*.dtype=auto",
    )
    p.add_argument("--model", action="append", help="a model (repeatable): replaces the bench's models")
    p.add_argument("--model-args", help="settings of every model, lm-eval style: dtype=bfloat16,revision=main")
    p.add_argument("--task", action="append", help="a task (repeatable): replaces the bench's tasks")
    p.add_argument(
        "--method", action="append", help="a method or '{name: cache, window: 512}' (repeatable): replaces the methods"
    )
    p.add_argument("--limit", type=int, help="the first N documents of each task (limits.docs)")
    p.add_argument("--limit-tokens", type=int, help="at most N tokens of each task (limits.tokens)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (device)")
    p.add_argument("--output", help="the run folder, e.g. runs/quick (output_dir and run)")


def _add_run_commands(sub) -> None:
    """run and prepare: a bench file into cells."""
    r = sub.add_parser("run", help="run every unfinished cell of a bench file, then write the leaderboard")
    _add_bench_arguments(r)
    r.add_argument("--force", action="store_true", help="recompute cells that already have results")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument(
        "--check", action="store_true", help="also run the validity checks of each cell's setting; stored in its record"
    )
    r.add_argument(
        "--log-tokens",
        action="store_true",
        help="keep every scored token's log-probability beside its cell (for `report`)",
    )
    r.set_defaults(fn=_cmd_run)
    pr = sub.add_parser(
        "prepare",
        help="run each cell's preparation (training, datastores, statistics) ahead of time; `run` then only evaluates",
    )
    _add_bench_arguments(pr)
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")
    pr.set_defaults(fn=_cmd_prepare)


def _add_inspection_commands(sub) -> None:
    """check, validate and list: what a bench or a method would do, before any result."""
    c = sub.add_parser(
        "check", help="validity checks (causality, normalisation, split separation, determinism) of every method"
    )
    c.add_argument("bench")
    c.add_argument("--model", default="tiny", help="model to check on (default: tiny, the 2-layer test model)")
    c.add_argument("--device", default="cpu", help="device (default: cpu; determinism is checked on CPU only)")
    c.add_argument(
        "--only-bench", action="store_true", help="only the bench's method settings, not every registered method"
    )
    c.add_argument(
        "--full-params", action="store_true", help="the settings as given, without each method's quick_params"
    )
    c.add_argument("--json", help="also write the full reports to this JSON file")
    c.set_defaults(fn=_cmd_check)
    v = sub.add_parser(
        "validate", help="check a bench file (with the same --set and flags as run) and report every problem"
    )
    _add_bench_arguments(v)
    v.set_defaults(fn=_cmd_validate)
    ls = sub.add_parser("list", help="methods, tasks and models with a one-line description")
    ls.add_argument("kind", nargs="?", choices=["methods", "tasks", "models"])
    ls.add_argument("--plugins", nargs="*", help="extra plugin folders or files")
    ls.set_defaults(fn=_cmd_list)


def _add_results_commands(sub) -> None:
    """leaderboard and report: tables and analyses from finished cells."""
    lb = sub.add_parser(
        "leaderboard", help="Markdown, CSV, JSON, HTML tables and Pareto plots from one or more results folders"
    )
    lb.add_argument("results", nargs="+", help="results folders (e.g. results/default); several are merged")
    lb.add_argument("--out", help="where to write (default: the first folder)")
    lb.add_argument(
        "--allow-mixed",
        action="store_true",
        help="merge cells whose provenance (harness version, data or model hash) differs",
    )
    lb.add_argument("--readme", help="also replace the results block of this README")
    lb.set_defaults(fn=_cmd_leaderboard)
    rp = sub.add_parser(
        "report",
        help="REPORT.md: where each method gains, by token frequency, repetition and position (needs log_tokens)",
    )
    rp.add_argument("results", help="a results folder whose cells have per-token logs")
    rp.add_argument(
        "--against",
        default="none",
        help="the baseline label (default: none); each method is also set against its control",
    )
    rp.set_defaults(fn=_cmd_report)
    ex = sub.add_parser(
        "export", help="a results folder in lm-evaluation-harness's layout: results_<date>.json and samples_*.jsonl"
    )
    ex.add_argument("results", help="a results folder (e.g. results/pilot)")
    ex.add_argument("--format", choices=["lm-eval"], default="lm-eval", help="the layout (default: lm-eval)")
    ex.add_argument("--out", help="where to write (default: RESULTS/lm-eval)")
    ex.set_defaults(fn=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tta-bench", description="Benchmark test-time adaptation of language models.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_inspection_commands(sub)
    _add_results_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except RunFailed as e:  # the other cells and the leaderboard were written
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TTABenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished cells are saved; rerun the same command to resume", file=sys.stderr)
        return 130
