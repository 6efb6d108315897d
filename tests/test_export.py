"""`export --format lm-eval` (results/export.py), read back by lm-evaluation-harness's own code: its
file-name readers, its results table, its aggregations of the per-document samples, its task hash,
its result schema, and the `datasets` JSON loader its EvaluationTracker reads results files with.
lm-eval is the `lmeval` extra (pip install ".[lmeval]"): without it the test is skipped."""

from __future__ import annotations

import importlib.util
import json
import math
import typing

import pytest

from tests.conftest import write_bench
from tta_bench.cli import main
from tta_bench.results.leaderboard import load_records, rows
from tta_bench.run import runner

pytestmark = pytest.mark.usefixtures("one_thread")
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason='lm-eval is the lmeval extra: pip install ".[lmeval]"'
)


@pytest.fixture()
def exported(tmp_path, corpus):
    """A tiny bench (none and the cache, a test-time method) and its export."""
    bench = write_bench(tmp_path, corpus, methods=["none", {"name": "cache", "window": 32}])
    run_dir = runner.run(str(bench), log=lambda *a: None)
    assert main(["export", str(run_dir), "--format", "lm-eval", "--out", str(tmp_path / "lm")]) == 0
    return run_dir, tmp_path / "lm"


def _leaves(value, key=""):
    """Every number of a leaderboard row field, by the flattened name the export gives it."""
    if isinstance(value, dict):
        return {k: v for sub, item in value.items() for k, v in _leaves(item, f"{key}_{sub}").items()}
    if isinstance(value, (list, tuple)):
        return {f"{key}_low": value[0], f"{key}_high": value[1]}
    return {key: value}


@needs_lm_eval
def test_lm_eval_reads_the_export(exported):
    from lm_eval import utils
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    run_dir, out = exported
    files = sorted(str(p) for p in out.rglob("*") if p.is_file())
    assert {p.split("/")[-2] for p in files} == {"tiny+none", "tiny+cache(window=32)"}
    records, _ = load_records([run_dir])
    table = next(iter(rows(records).values()))
    for rec in records:
        folder = [f for f in files if f"/tiny+{rec.label}/" in f]
        (results_file,) = utils.get_results_filenames(folder)
        (samples_file,) = utils.get_sample_results_filenames(folder)
        assert utils.get_latest_filename(folder) == results_file
        assert utils.get_file_datetime(results_file.split("/")[-1].removesuffix(".json")) == utils.get_file_datetime(
            samples_file
        )
        task = utils.get_file_task_name(samples_file.split("/")[-1])
        assert task == "text-test"

        data = json.loads(open(results_file).read())
        entry, lines = data["results"][task], [json.loads(x) for x in open(samples_file)]
        assert [s["doc_id"] for s in lines] == list(range(len(rec.per_doc)))
        # lm-eval's aggregations of the samples give the results file's numbers, and the cell's own
        assert entry["word_perplexity,none"] == pytest.approx(
            weighted_perplexity([tuple(s["word_perplexity"]) for s in lines])
        )
        assert entry["byte_perplexity,none"] == pytest.approx(
            weighted_perplexity([tuple(s["byte_perplexity"]) for s in lines])
        )
        assert entry["bits_per_byte,none"] == pytest.approx(bits_per_byte([tuple(s["bits_per_byte"]) for s in lines]))
        assert entry["word_perplexity,none"] == pytest.approx(rec.metrics["word_ppl"], rel=1e-12)
        assert entry["bits_per_byte,none"] == pytest.approx(rec.metrics["bits_per_byte"], rel=1e-12)
        assert entry["byte_perplexity,none"] == pytest.approx(2 ** rec.metrics["bits_per_byte"], rel=1e-12)
        expected = utils.hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in lines))
        assert data["task_hashes"][task] == expected

        row = next(r for r in table if r["method"] == rec.label)  # the paired differences, under their own names
        deltas = {k: v for key in row if key.startswith(("delta", "vs")) for k, v in _leaves(row[key], key).items()}
        assert {f"{k},none": v for k, v in deltas.items() if v is not None} == {
            k: v for k, v in entry.items() if k.split(",")[0] in deltas and v is not None
        }
        if rec.label != "none":
            assert any(isinstance(v, float) and math.isfinite(v) for v in deltas.values())
        assert "word_perplexity" in utils.make_table(data) and task in utils.make_table(data)


@needs_lm_eval
def test_the_files_fit_lm_evals_schema_and_its_json_loader(exported):
    import datasets

    from lm_eval.result_schema import EvalResults, SampleResult

    _, out = exported
    results_file = next(out.rglob("results_*.json"))
    data = json.loads(results_file.read_text())
    assert set(data) <= set(typing.get_type_hints(EvalResults)) and {
        "results",
        "configs",
        "versions",
        "n-shot",
        "config",
        "git_hash",
        "date",
    } <= set(data)
    fixed = set(SampleResult.__required_keys__ | SampleResult.__optional_keys__) - {"__extra_items__"}
    for line in next(out.rglob("samples_*.jsonl")).read_text().splitlines():
        assert fixed <= set(json.loads(line))
    # how lm-eval's EvaluationTracker reads a results file back (recreate_metadata_card)
    loaded = datasets.load_dataset("json", data_files=str(results_file), split="train")
    assert (
        loaded["results"][0]["text-test"]["word_perplexity,none"]
        == data["results"]["text-test"]["word_perplexity,none"]
    )
    samples = datasets.load_dataset("json", data_files=str(next(out.rglob("samples_*.jsonl"))), split="train")
    assert len(samples) == data["n-samples"]["text-test"]["effective"] == len(samples["doc_id"])


def test_a_task_under_two_protocols_or_no_cells_is_refused_in_one_line(tmp_path, corpus, capsys):
    bench = write_bench(tmp_path, corpus)
    for seg in (8, 16):  # one run folder, the same task under two protocols: lm-eval has one entry per task
        runner.run(str(bench), sets=(f"protocol.segment_len={seg}",), log=lambda *a: None)
    run_dir = tmp_path / "results" / "t"
    assert main(["export", str(run_dir), "--out", str(tmp_path / "lm")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "segment 8" in err and "segment 16" in err
    assert "one protocol, limit and device per task" in err and not (tmp_path / "lm").exists()
    assert main(["export", str(tmp_path)]) == 2
    assert "has no cells/ folder" in capsys.readouterr().err
