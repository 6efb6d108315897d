"""`export RESULTS --format lm-eval`: a results folder in lm-evaluation-harness's layout, so that what
reads its output reads ours. As lm-eval writes one folder per evaluated model, each (model, method
setting) is one "model" here: OUT/<model>+<setting>/results_<date>.json with one entry per task
(word_perplexity, byte_perplexity and bits_per_byte under lm-eval's `metric,filter` names, token
perplexity and the leaderboard's paired differences under their own), and samples_<task>_<date>.jsonl
with one line per document (its log-likelihood beside its words and bytes, as lm-eval's wikitext
task logs them, so that lm-eval's aggregations give the numbers of the results file). Several seeds
of a setting: each document's NLL is their mean (as the leaderboard pairs them)."""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
from pathlib import Path

from tta_bench.api.errors import TTABenchError
from tta_bench.results.files import atomic_write
from tta_bench.results.records import CellRecord

FILTER = "none"  # lm-eval's name for "no filter": its keys are `metric,filter`
# lm-eval's perplexity metrics: (metric, the per-document count it divides by, its aggregation)
METRICS = (
    ("word_perplexity", "words", "weighted_perplexity"),
    ("byte_perplexity", "bytes", "weighted_perplexity"),
    ("bits_per_byte", "bytes", "bits_per_byte"),
)


def sanitize(name: str) -> str:
    """A model folder's name: lm-eval's sanitize_model_name, and spaces as '_'."""
    return re.sub(r"\s+", "_", re.sub(r"[\"<>:/|\\?*\[\]]+", "__", name.strip()))


def task_name(label: str) -> str:
    """A task's name in file names: what lm-eval's get_file_task_name reads back (no spaces or '/')."""
    return re.sub(r"[^\w.()-]+", "_", label).strip("_")


def export_lm_eval(results: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the lm-eval layout of a results folder into `out` (default RESULTS/lm-eval); the files written."""
    from tta_bench.results.leaderboard import load_records, rows

    results = Path(results)
    records, _ = load_records([results])
    out = Path(out) if out else results / "lm-eval"
    tables = rows(records)
    written = []
    for (model, label), entries in sorted(_by_system(records, tables).items()):
        written += _write_system(out / sanitize(f"{model}+{label}"), model, label, entries)
    return written


def _by_system(records: list[CellRecord], tables: dict) -> dict:
    """(model, setting label) -> task name -> (its cells, its leaderboard row); a task twice (two
    protocols, limits or devices in one folder) is refused: lm-eval has one entry per task."""
    from tta_bench.results.leaderboard import table_key

    systems: dict = {}
    for rec in records:
        key = table_key(rec)
        task = task_name(key[0].replace(":", "-"))
        entry = systems.setdefault((key[1], rec.label), {}).setdefault(task, {"key": key, "cells": []})
        if entry["key"] != key:
            raise TTABenchError(
                f"{key[1]} · {rec.label} · {key[0]} is in the folder twice ({' · '.join(entry['key'][2:])}, and"
                f" {' · '.join(key[2:])}); export folders that hold one protocol, limit and device per task"
            )
        entry["cells"].append(rec)
    for tasks in systems.values():
        for entry in tasks.values():
            label = entry["cells"][0].label
            entry["row"] = next(r for r in tables[entry["key"]] if r.get("method") == label)
    return systems


def _docs(cells: list[CellRecord]) -> list[dict]:
    """Per document: title, NLL (the mean over the seeds), tokens, words, bytes."""
    first = cells[0].per_doc
    if any(len(c.per_doc) != len(first) for c in cells):
        raise TTABenchError(f"the seeds of {cells[0].label} scored different documents; rerun them with one bench")
    return [{**d, "nll": sum(c.per_doc[i]["nll"] for c in cells) / len(cells)} for i, d in enumerate(first)]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()  # lm-eval's utils.hash_string


def samples(docs: list[dict]) -> list[dict]:
    """One lm-eval sample per document (a loglikelihood_rolling request: its response is the document's
    log-likelihood); the text itself is not in a cell record, so `doc` holds the title."""
    out = []
    for i, d in enumerate(docs):
        loglik, doc = -d["nll"], {"title": d["title"]}
        sample = {
            "doc_id": i,
            "doc": doc,
            "target": "",
            "arguments": {"gen_args_0": {"arg_0": d["title"]}},
            "resps": [[loglik]],
            "filtered_resps": [loglik],
            "filter": FILTER,
            "metrics": [m for m, _, _ in METRICS] + ["token_perplexity"],
            "doc_hash": _hash(json.dumps(doc, sort_keys=True)),
            "prompt_hash": _hash(d["title"]),
            "target_hash": _hash(""),
        }
        sample.update({m: [loglik, d[count]] for m, count, _ in METRICS})
        sample["token_perplexity"] = [loglik, d["tokens"]]
        out.append(sample)
    return out


def task_results(task: str, docs: list[dict], row: dict) -> dict:
    """The task's entry of `results`: lm-eval's perplexities from the documents, then the row's
    paired differences (every field named delta... or vs...) flattened under their own names."""
    nll = sum(d["nll"] for d in docs)
    words, n_bytes, tokens = (sum(d[k] for d in docs) for k in ("words", "bytes", "tokens"))
    values = {
        "word_perplexity": math.exp(nll / words),
        "byte_perplexity": math.exp(nll / n_bytes),
        "bits_per_byte": nll / (n_bytes * math.log(2)),
        "token_perplexity": math.exp(nll / tokens),
    }
    out = {"alias": task}
    for name, value in values.items():
        out[f"{name},{FILTER}"] = value
        out[f"{name}_stderr,{FILTER}"] = "N/A"  # as lm-eval gives perplexities: intervals are the leaderboard's
    for key in sorted(k for k in row if k.startswith(("delta", "vs"))):
        out.update({f"{name},{FILTER}": v for name, v in _flatten(key, row[key]).items()})
    return out


def _flatten(key: str, value) -> dict:
    """A row field as numbers and flags: a mapping's entries as key_entry, an interval [low, high] as
    _low/_high; text (a label) is left out."""
    if isinstance(value, dict):
        return {k: v for sub, item in value.items() for k, v in _flatten(f"{key}_{sub}", item).items()}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {f"{key}_low": value[0], f"{key}_high": value[1]}
    return {key: value} if value is None or isinstance(value, (int, float)) else {}  # bools too: `significant`


def _date_id(cells: list[CellRecord]) -> tuple[str, float]:
    """The newest cell's date as lm-eval names files (its isoformat, ':' as '-'), and the oldest's as
    the UNIX time lm-eval's `date` holds."""
    dates = sorted(datetime.datetime.fromisoformat(c.provenance["date"]) for c in cells)
    newest = dates[-1].astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return newest.isoformat().replace(":", "-"), dates[0].timestamp()


def _write_system(folder: Path, model: str, label: str, entries: dict) -> list[Path]:
    cells = [c for e in entries.values() for c in e["cells"]]
    date_id, started = _date_id(cells)
    results, written, task_hashes = {}, [], {}
    for task, entry in sorted(entries.items()):
        docs = _docs(entry["cells"])
        results[task] = task_results(task, docs, entry["row"])
        logged = samples(docs)
        task_hashes[task] = _hash("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in logged))
        path = folder / f"samples_{task}_{date_id}.jsonl"
        atomic_write(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in logged))
        written.append(path)
    body = _header(model, label, entries, cells, results) | {"task_hashes": task_hashes, "date": started}
    path = folder / f"results_{date_id}.json"
    atomic_write(path, json.dumps(body, indent=2, ensure_ascii=False))
    return [path, *written]


def _header(model: str, label: str, entries: dict, cells: list[CellRecord], results: dict) -> dict:
    """Everything of lm-eval's results file but the per-task numbers' hashes and date."""
    first = cells[0]
    prov, name = first.provenance, f"{model}+{label}"
    better = {m: False for m, _, _ in METRICS} | {"token_perplexity": False}
    deltas = {k.split(",")[0] for entry in results.values() for k in entry if "delta_" in k}
    better |= {k: False for k in sorted(deltas)}  # a difference to a reference: lower is a gain
    return {
        "results": results,
        "group_subtasks": {task: [] for task in results},
        "configs": {task: _task_config(task, e["cells"][0]) for task, e in entries.items()},
        "versions": {task: prov["versions"].get("tta-bench") for task in results},
        "n-shot": {task: 0 for task in results},
        "higher_is_better": {task: better for task in results},
        "n-samples": {task: _sample_count(e["cells"][0]) for task, e in entries.items()},
        "config": {
            "model": "tta-bench",
            "model_args": {**first.config["model"], "method": first.config["method"]},
            "model_dtype": (first.resolved or {}).get("model_dtype", first.config["dtype"]),  # older cells: the bench's
            "batch_size": None,
            "device": first.device,
            "limit": first.config["limits"].get("docs"),
            "random_seed": sorted({c.seed for c in cells})[0],
            "seeds": sorted({c.seed for c in cells}),
        },
        "git_hash": (prov.get("git", {}).get("commit") or "")[:7] or None,
        "transformers_version": prov["versions"].get("transformers"),
        "model_source": "tta-bench",
        "model_name": name,
        "model_name_sanitized": sanitize(name),
    }


def _sample_count(cell: CellRecord) -> dict:
    """lm-eval's original and effective document counts; under a limit the split's full count is not
    in the record (null)."""
    limited = any(v for k, v in cell.config["limits"].items() if k in ("docs", "tokens", "doc_tokens"))
    return {"original": None if limited else len(cell.per_doc), "effective": len(cell.per_doc)}


def _task_config(task: str, cell: CellRecord) -> dict:
    """The task as lm-eval's `configs` describe one (a rolling log-likelihood over documents), with the
    cell's protocol, limits and stream beside it."""
    return {
        "task": task,
        "dataset_path": cell.config["task"]["name"],
        "test_split": cell.config["task"]["split"],
        "output_type": "loglikelihood_rolling",
        "num_fewshot": 0,
        "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False} for m, _, agg in METRICS],
        "metadata": {
            "version": cell.provenance["versions"].get("tta-bench"),
            "tta_bench": {
                "task": cell.config["task"],
                "protocol": cell.resolved and {k: cell.resolved[k] for k in ("segment_len", "context_len", "reset")},
                "limits": cell.config["limits"],
                "stream": cell.stream,
                "word_count": "whitespace words plus one per line (the WikiText convention, SPEC 4)",
            },
        },
    }
