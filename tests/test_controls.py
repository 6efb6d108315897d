"""The controls (SPEC 3): FWL with step sizes fixed at 0 from the start, the fine-tuned base model,
dynamic evaluation on top of it, and how the leaderboard sets each test-time method against its control."""

from __future__ import annotations


import pytest
import torch

from tests.test_fwl import TEXT, make, run, stream_of
from tta_bench.protocol.evaluate import Protocol
from tta_bench.api.method import method_class
from tta_bench.results.records import CellRecord
from tta_bench.api.registry import discover

PROTOCOL = Protocol(16, 1, "document")


def test_fwl_static_is_trained_with_step_sizes_zero_and_runs_only_the_slow_block(tiny_lm):
    fast = make(tiny_lm, train_steps=6)
    static = make(tiny_lm, name="fwl-static", train_steps=6)
    assert all(p.item() == 0 for p in static.block.eta.values())  # never moved: not in the optimizer
    assert any(abs(p.item() - 0.01) > 1e-4 for p in fast.block.eta.values())  # the fast block's did move
    # trained, not a copy of the untrained block: its slow weights moved from the same start
    assert not torch.equal(static.block.dense1.weight, fast.block.dense1.weight)
    stream = stream_of(tiny_lm, TEXT)
    got = run(static, stream, PROTOCOL)
    seg_logprobs = []  # independently: the slow block on the base hidden states, nothing else
    from tta_bench.protocol.evaluate import segments

    for seg, _, _ in segments(stream, PROTOCOL, tiny_lm.start_id):
        with torch.no_grad():
            h = tiny_lm.hidden(seg.ids)[0]
            logits = static.block.logits(static.block.slow(h.float()[None]).z, tiny_lm.logits(h)[None])[0, -seg.n :]
        seg_logprobs.append(torch.log_softmax(logits, -1))
    assert all(torch.allclose(a, b, atol=1e-5) for (_, a), b in zip(got, seg_logprobs))
    # the fast block's scores differ from its slow pass far beyond that tolerance: the control removes something
    fast_got = run(fast, stream, PROTOCOL)
    assert max((a - b).abs().max().item() for (_, a), (_, b) in zip(fast_got, got)) > 100 * 1e-5


def test_controls_name_the_matching_setting():
    discover()
    fwl = method_class("fwl").make_params({"size": 32, "train_steps": 7})[0]
    want = method_class("fwl").control(fwl)
    assert want["method"] == "fwl-static" and want["params"]["size"] == 32 and want["params"]["train_steps"] == 7
    assert (
        method_class("fwl-dynamic-eval").control(method_class("fwl-dynamic-eval").make_params({})[0])["method"]
        == "fwl-static"
    )
    assert "train_fast_state" not in want["params"]  # fwl-static reads shuffled pieces too, by default
    carried = method_class("fwl").control(
        method_class("fwl").make_params({"fast_state": "document", "recurrent": True})[0]
    )
    assert (
        carried["params"]["train_fast_state"] == "document" and "recurrent" not in carried["params"]
    )  # same reading order
    assert not method_class("fwl-static").adapts_at_test_time(method_class("fwl-static").make_params({})[0])
    knn = method_class("knn-lm")
    assert knn.control(knn.make_params({})[0]) is None and not knn.adapts_at_test_time(knn.make_params({})[0])
    online = knn.make_params({"online": True, "k": 8})[0]
    assert knn.control(online) == {
        "method": "knn-lm",
        "params": {**knn.control(online)["params"], "online": False, "k": 8},
    }
    ft = method_class("finetune-dynamic-eval").make_params({"blocks": 1})[0]
    assert method_class("finetune-dynamic-eval").control(ft)["params"]["blocks"] == 1
    assert method_class("dynamic-eval").control(method_class("dynamic-eval").make_params({})[0]) is None
    assert not method_class("none").adapts_at_test_time(None)


def test_finetune_lowers_the_validation_loss_and_scores_with_its_own_copy(tiny_lm):
    before = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    ft = make(tiny_lm, "finetune", PROTOCOL, train_steps=12, eval_every=4, train_lr=3e-3)
    history = ft.info["history"]
    assert history[0]["step"] == 0 and min(h["val_nll"] for h in history[1:]) < history[0]["val_nll"] - 0.01
    assert ft.info["val_nll"] == min(h["val_nll"] for h in history)  # the best weights are kept
    # the shared model is untouched; the copy differs in the last block only
    assert all(torch.equal(p, before[n]) for n, p in tiny_lm.model.named_parameters())
    changed = {n for n, p in ft.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".layers.1." in n for n in changed), changed
    # the prepared weights come from the cache the second time, identical
    again = make(tiny_lm, "finetune", PROTOCOL, train_steps=12, eval_every=4, train_lr=3e-3)
    assert again._events[-1]["hit"] and again._events[-1]["flops"] == ft._events[-1]["flops"] > 0
    assert all(torch.equal(p, dict(again.model.named_parameters())[n]) for n, p in ft.model.named_parameters())


def test_finetune_dynamic_eval_starts_from_the_finetuned_weights_and_gives_the_base_back(tiny_lm):
    values = {"train_steps": 8, "eval_every": 4, "train_lr": 3e-3, "lr": 0.05}
    before = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    ft = make(tiny_lm, "finetune", PROTOCOL, **{k: v for k, v in values.items() if k != "lr"})
    stream = stream_of(tiny_lm, TEXT)
    static = run(ft, stream, PROTOCOL)
    dyn = make(tiny_lm, "finetune-dynamic-eval", PROTOCOL, **values)
    try:
        adapted = run(dyn, stream, PROTOCOL)
    finally:
        dyn.close()
    # each document's first segment is scored before any update: the fine-tuned model's scores
    firsts = [i for i, (doc, _) in enumerate(static) if i == 0 or static[i - 1][0] != doc]
    assert all(torch.allclose(adapted[i][1], static[i][1], atol=1e-5) for i in firsts)
    later = [i for i in range(len(static)) if i not in firsts]
    assert max((adapted[i][1] - static[i][1]).abs().max().item() for i in later) > 1e-3  # the adaptation shows
    assert all(torch.equal(p, before[n]) for n, p in tiny_lm.model.named_parameters())


def _record(label, method, params, nll, role, tokens=(100, 100, 100)):
    """A finished cell's record as the leaderboard reads it: its file's mapping through CellRecord."""
    return CellRecord.from_json(
        {
            "schema": "tta-bench/cell/v2",
            "cell_id": label,
            "label": label,
            "status": "ok",
            "config": {
                "task": {"name": "t", "split": "test"},
                "model": {"name": "m"},
                "method": {"name": method},
                "limits": {},
                "seed": 0,
            },
            "resolved": {
                "segment_len": 16,
                "context_len": 1,
                "reset": "document",
                "method_params": params,
                "model_fingerprint": "f",
            },
            "stream": {"fingerprint": "s", "task": "t"},
            "role": role,
            "resume_key": {},
            "metrics": {
                "token_ppl": 1.0,
                "word_ppl": 1.0,
                "bits_per_byte": 1.0,
                "ci95": {"token_ppl": [1, 1]},
                "nll_sum": sum(nll),
            },
            "per_doc": [{"nll": n, "tokens": t} for n, t in zip(nll, tokens)],
            "costs": {
                "gflops_per_token": 1.0,
                "tokens_per_second": 1.0,
                "peak_memory_bytes": 1,
                "prepare_seconds": 0,
                "prepare_flops": 0,
                "device": "cpu",
            },
        }
    )


def test_the_leaderboard_sets_each_method_against_its_control(tmp_path):
    import math

    from tta_bench.results.leaderboard import rows

    recs = [
        _record("none", "none", {}, [300, 200, 250], {"test_time": False, "control": None}),
        _record("static", "fwl-static", {"size": 8, "lr": 1.0}, [280, 190, 240], {"test_time": False, "control": None}),
        _record(
            "other static", "fwl-static", {"size": 16, "lr": 1.0}, [10, 10, 10], {"test_time": False, "control": None}
        ),
        _record(
            "fwl",
            "fwl",
            {"size": 8, "lr": 1.0},
            [272, 185, 235],
            {"test_time": True, "control": {"method": "fwl-static", "params": {"size": 8}}},
        ),
        _record("cache", "cache", {}, [290, 195, 245], {"test_time": True, "control": None}),
        _record(
            "lost",
            "fwl",
            {"size": 4},
            [1, 1, 1],
            {"test_time": True, "control": {"method": "fwl-static", "params": {"size": 4}}},
        ),
    ]
    table = {r["method"]: r for r in next(iter(rows(recs).values()))}
    ppl = {
        k: math.exp(sum(n) / 300)
        for k, n in [("none", [300, 200, 250]), ("static", [280, 190, 240]), ("fwl", [272, 185, 235])]
    }
    assert table["fwl"]["control"] == "static" and table["fwl"]["kind"] == "TTA"
    assert table["fwl"]["vs_control"]["delta_ppl"] == pytest.approx(ppl["fwl"] - ppl["static"])
    assert table["fwl"]["vs_none"]["delta_ppl"] == pytest.approx(ppl["fwl"] - ppl["none"])
    assert table["fwl"]["vs_control"]["excludes_zero"]  # better on every document, by a steady margin
    assert table["cache"]["control"] == "none" and table["cache"]["vs_control"] == table["cache"]["vs_none"]
    assert table["static"]["kind"] == "control" and table["static"]["vs_control"] is None
    assert table["none"]["kind"] == "base" and table["none"]["vs_none"] is None
    assert table["lost"]["control"] is None and table["lost"]["vs_control"] is None  # its control was not run


def test_prepare_costs_are_the_same_whether_built_or_cached(tiny_lm):
    """A cell that finds its block cached is charged what building it cost, the shared feature pass
    its build read included, and nothing twice."""
    first = make(tiny_lm, train_steps=3, size=6)  # a size no other test uses: built here
    again = make(tiny_lm, train_steps=3, size=6)
    assert not next(e for e in first._events if e["kind"] == "fwl-block")["hit"]
    assert all(e["hit"] for e in again._events)
    assert sorted(e["kind"] for e in again._events) == sorted(e["kind"] for e in first._events)
    total = sum(e["flops"] for e in first._events)
    assert total > 0 and sum(e["flops"] for e in again._events) == pytest.approx(total)
